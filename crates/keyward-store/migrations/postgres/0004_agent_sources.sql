-- Agents may be bound to source networks (JSON array of CIDRs; NULL: anywhere).
ALTER TABLE agents ADD COLUMN allow_from TEXT;
