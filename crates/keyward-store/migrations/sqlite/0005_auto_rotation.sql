-- Automated rotation: hook name, whether it gets the current value, verify probe (JSON).
ALTER TABLE secrets ADD COLUMN auto_rotation TEXT;
