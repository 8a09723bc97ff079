//! Reading values and passphrases: stdin, a file, or a no-echo prompt.

use std::io::{IsTerminal, Read};
use std::path::Path;

use zeroize::Zeroizing;

use crate::commands::CliError;

const MAX_INPUT: u64 = 64 * 1024 + 2;

/// A value from `--from-file`, piped stdin, or a no-echo prompt. One
/// trailing newline (`\n` or `\r\n`) is dropped: `echo KEY |` and files
/// ending in a newline store the key itself.
pub fn read_value(from_file: Option<&Path>, prompt: &str) -> Result<Zeroizing<String>, CliError> {
    let mut raw = Zeroizing::new(Vec::new());
    if let Some(path) = from_file {
        let f = std::fs::File::open(path).map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
        f.take(MAX_INPUT).read_to_end(&mut raw).map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
    } else if std::io::stdin().is_terminal() {
        let s = rpassword::prompt_password(prompt).map_err(|e| CliError::Input(format!("prompt: {e}")))?;
        raw.extend_from_slice(Zeroizing::new(s).as_bytes());
    } else {
        std::io::stdin().take(MAX_INPUT).read_to_end(&mut raw).map_err(|e| CliError::Input(format!("stdin: {e}")))?;
    }
    if raw.ends_with(b"\n") {
        raw.pop();
        if raw.ends_with(b"\r") {
            raw.pop();
        }
    }
    let s = String::from_utf8(std::mem::take(&mut *raw)).map_err(|e| {
        let _ = Zeroizing::new(e.into_bytes());
        CliError::Input("the value is not UTF-8 text".into())
    })?;
    Ok(Zeroizing::new(s))
}
