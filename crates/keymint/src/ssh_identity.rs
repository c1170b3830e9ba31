//! `keymint run` for SSH roles: a key pair made for the command, its
//! certificate, both in a private temporary directory that is removed when
//! the command exits. The private key never leaves this machine; keymint's
//! server only sees the public key.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use ssh_key::private::Ed25519Keypair;
use ssh_key::{LineEnding, PrivateKey};
use zeroize::Zeroizing;

/// A fresh Ed25519 key pair for one command.
#[derive(Debug)]
pub struct Identity {
    dir: PathBuf,
    key: PrivateKey,
}

impl Identity {
    /// Makes the key pair and the 0700 directory that will hold it.
    pub fn generate(tmp: &Path) -> anyhow::Result<Self> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut())
            .map_err(|_| anyhow::anyhow!("the random number generator failed"))?;
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        let mut name = [0u8; 12];
        getrandom::fill(&mut name)
            .map_err(|_| anyhow::anyhow!("the random number generator failed"))?;
        let dir = tmp.join(format!("keymint-ssh-{}", hex::encode(name)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create `{}`", dir.display()))?;
        Ok(Self { dir, key })
    }

    pub fn public_key(&self) -> anyhow::Result<String> {
        Ok(self.key.public_key().to_openssh()?)
    }

    /// Writes the private key and the certificate, both mode 0600, and
    /// returns the environment for the command: `KEYMINT_SSH_IDENTITY`
    /// (use with `ssh -i`; ssh loads `<identity>-cert.pub` beside it) and
    /// `KEYMINT_SSH_CERTIFICATE`.
    pub fn write(&self, certificate: &str) -> anyhow::Result<Vec<(String, String)>> {
        let identity = self.dir.join("id_ed25519");
        let cert = self.dir.join("id_ed25519-cert.pub");
        let pem = self.key.to_openssh(LineEnding::LF)?;
        write_private(&identity, pem.as_bytes())?;
        write_private(&cert, format!("{}\n", certificate.trim()).as_bytes())?;
        Ok(vec![
            (
                "KEYMINT_SSH_IDENTITY".to_owned(),
                identity.display().to_string(),
            ),
            (
                "KEYMINT_SSH_CERTIFICATE".to_owned(),
                cert.display().to_string(),
            ),
        ])
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create `{}`", path.display()))?;
    f.write_all(data)?;
    Ok(())
}
