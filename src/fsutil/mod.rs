//! File utilities every layer uses: crash-safe writes ([`atomic`]) and content hashes.
//!
//! ```
//! let dir = std::env::temp_dir().join(format!("dpo-fsutil-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! dpo::fsutil::atomic::write_bytes(&dir.join("a.txt"), b"abc").unwrap();
//! let h = dpo::fsutil::sha256_file(&dir.join("a.txt")).unwrap();
//! assert_eq!(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```
pub mod atomic;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// The sha256 of a file's content, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
