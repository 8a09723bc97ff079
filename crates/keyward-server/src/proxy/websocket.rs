//! WebSocket pass-through (e.g. OpenAI's Realtime API): the handshake goes
//! to the bound origin with the real key injected, then frames flow both
//! ways. Frames from the upstream are parsed and their payloads redacted like
//! any response body (compression is not negotiated, so payloads are plain).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::redact::Redactor;

const MAX_FRAME: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame over 16 MiB")]
    TooLarge,
    #[error("extension bits set without a negotiated extension")]
    Reserved,
    #[error("reserved opcode {0}")]
    Opcode(u8),
}

/// Copies upstream → agent frame by frame, redacting data payloads, and
/// counts the payload bytes sent in `sent` as it goes (the audit record
/// wants them also when the agent's side ends the tunnel first).
pub async fn copy_redacted<R, W>(
    mut from: R,
    mut to: W,
    mut redactor: Redactor,
    sent: &std::sync::atomic::AtomicU64,
) -> Result<(), FrameError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut head = [0u8; 2];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let fin = head[0] & 0x80 != 0;
        if head[0] & 0x70 != 0 {
            return Err(FrameError::Reserved);
        }
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => u64::from(from.read_u16().await?),
            127 => from.read_u64().await?,
            n => u64::from(n),
        };
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge);
        }
        let mut mask = [0u8; 4];
        if masked {
            from.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        from.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        if (3..=7).contains(&opcode) || opcode > 0xa {
            return Err(FrameError::Opcode(opcode));
        }
        let out = if opcode <= 2 {
            // Data (text, binary, continuation): a message may span frames,
            // so the redactor carries across them until the final one.
            let mut clean = redactor.push(&payload);
            if fin {
                clean.extend(redactor.finish());
            }
            clean
        } else {
            // Close (code + reason), ping, pong: a reason can echo the key
            // too. Control payloads stay within the protocol's 125 bytes.
            let (head, body) =
                if opcode == 0x8 && payload.len() >= 2 { payload.split_at(2) } else { payload.split_at(0) };
            let mut out = head.to_vec();
            out.extend(redactor.redact_all(body).unwrap_or_else(|| body.to_vec()));
            out.truncate(125);
            out
        };
        write_frame(&mut to, fin, opcode, &out).await?;
        sent.fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if opcode == 0x8 {
            break; // close
        }
    }
    to.shutdown().await.ok();
    Ok(())
}

/// A server-to-client frame: never masked.
async fn write_frame<W: AsyncWrite + Unpin>(to: &mut W, fin: bool, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(10);
    head.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n if n < 126 => head.push(n as u8),
        n if n <= u16::MAX as usize => {
            head.push(126);
            head.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            head.push(127);
            head.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    to.write_all(&head).await?;
    to.write_all(payload).await?;
    to.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        let sent = std::sync::atomic::AtomicU64::new(0);
        copy_redacted(&input[..], &mut out, Redactor::new(&[b"sk-SECRET-123456789"]), &sent).await.unwrap();
        assert!(sent.into_inner() > 0);
        out
    }

    #[tokio::test]
    async fn text_frames_are_redacted_and_reframed() {
        let msg = b"key=sk-SECRET-123456789!";
        let mut input = vec![0x81, msg.len() as u8];
        input.extend_from_slice(msg);
        let out = frames(input).await;
        let expected = b"key=[redacted by keyward]!";
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1] as usize, expected.len());
        assert_eq!(&out[2..], expected);
    }

    #[tokio::test]
    async fn a_key_split_across_fragments_is_redacted() {
        let (a, b) = (b"x sk-SECRET-12".as_slice(), b"3456789 y".as_slice());
        let mut input = vec![0x01, a.len() as u8];
        input.extend_from_slice(a);
        input.extend_from_slice(&[0x80, b.len() as u8]);
        input.extend_from_slice(b);
        let out = frames(input).await;
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("sk-SECRET"), "{text}");
        assert!(text.contains("[redacted by keyward]"), "{text}");
    }

    #[tokio::test]
    async fn close_reasons_are_redacted() {
        let reason = b"bad key sk-SECRET-123456789";
        let mut input = vec![0x88, (reason.len() + 2) as u8, 0x03, 0xe8];
        input.extend_from_slice(reason);
        let out = frames(input).await;
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("sk-SECRET"), "{text}");
        assert!(text.contains("[redacted by keyward]"));
        assert_eq!(&out[2..4], &[0x03, 0xe8], "the close code is kept");
    }

    #[tokio::test]
    async fn control_frames_pass_and_close_ends() {
        let input = vec![0x89, 0x01, b'p', 0x88, 0x00, 0x81, 0x01, b'z'];
        let out = frames(input).await;
        assert_eq!(out, vec![0x89, 0x01, b'p', 0x88, 0x00]);
    }
}
