//! Where a credential's key id and secret come from: inline config, or files that are re-read on
//! every fetch (so a rotated Kubernetes Secret takes effect without a restart).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::{CredentialConfig, FilePolicy, Provider};
use crate::secret::Secret;

/// An identity and its secret, read and ready to send: the Cloud.ru key id and secret, an OAuth2
/// client id and secret, or (for static keys) an empty id and the API key.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub id: Secret,
    pub secret: Secret,
}

impl Credentials {
    /// A fingerprint of the values, to notice a rotation without keeping a second copy around.
    pub fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.id.expose().hash(&mut h);
        self.secret.expose().hash(&mut h);
        h.finish()
    }
}

/// Reading a credential failed. Never carries the value.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is empty", .0.display())]
    Empty(PathBuf),
    #[error("{} is readable by every user; restrict it (e.g. Kubernetes defaultMode: 0400) or set auth.world_readable_secret_files", .0.display())]
    WorldReadable(PathBuf),
}

#[derive(Debug, Clone)]
enum Value {
    Inline(Secret),
    File { path: PathBuf, policy: FilePolicy, warned: Arc<AtomicBool> },
}

impl Value {
    fn file(path: &Path, policy: FilePolicy) -> Self {
        Value::File { path: path.to_path_buf(), policy, warned: Arc::default() }
    }

    async fn read(&self) -> Result<Secret, CredentialError> {
        match self {
            Value::Inline(s) => Ok(s.clone()),
            Value::File { path, policy, warned } => {
                if *policy != FilePolicy::Allow && world_readable(path).await {
                    if *policy == FilePolicy::Refuse {
                        return Err(CredentialError::WorldReadable(path.clone()));
                    }
                    if !warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(path = %path.display(), "Credential file is readable by every user; restrict its mode (e.g. 0400)");
                    }
                }
                let raw = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| CredentialError::Read { path: path.clone(), source })?;
                let trimmed = raw.trim();
                if trimmed.is_empty() {
                    return Err(CredentialError::Empty(path.clone()));
                }
                Ok(Secret::new(trimmed))
            }
        }
    }

    fn is_file(&self) -> bool {
        matches!(self, Value::File { .. })
    }
}

/// True if the file (following symlinks, as Kubernetes Secret volumes use them) is readable by
/// others. Unknown (no such file, or not Unix) counts as not: reading it reports the real error.
async fn world_readable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::metadata(path).await.is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// One configured credential.
#[derive(Debug, Clone)]
pub struct CredentialSource {
    name: Arc<str>,
    id: Value,
    secret: Value,
}

impl CredentialSource {
    /// From a validated config entry.
    pub fn from_config(c: &CredentialConfig, provider: Provider, policy: FilePolicy) -> Self {
        let value = |inline: &Option<Secret>, file: &Option<PathBuf>| match (inline, file) {
            (Some(s), _) => Value::Inline(s.clone()),
            (None, Some(p)) => Value::file(p, policy),
            (None, None) => Value::Inline(Secret::default()),
        };
        let (id, secret) = match provider {
            Provider::CloudruIam => (value(&c.key_id, &c.key_id_file), value(&c.secret, &c.secret_file)),
            Provider::Static => (Value::Inline(Secret::default()), value(&c.api_key, &c.api_key_file)),
            Provider::Oauth2ClientCredentials => {
                (value(&c.client_id, &c.client_id_file), value(&c.client_secret, &c.client_secret_file))
            }
        };
        Self { name: Arc::from(c.name.as_str()), id, secret }
    }

    /// An inline credential (tests, `sidekey dev`).
    pub fn inline(name: &str, key_id: &str, secret: &str) -> Self {
        Self {
            name: Arc::from(name),
            id: Value::Inline(Secret::new(key_id)),
            secret: Value::Inline(Secret::new(secret)),
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// True if any part comes from a file (and so can change).
    pub fn uses_files(&self) -> bool {
        self.id.is_file() || self.secret.is_file()
    }

    /// Reads the current values (files anew, trimmed).
    pub async fn read(&self) -> Result<Credentials, CredentialError> {
        Ok(Credentials { id: self.id.read().await?, secret: self.secret.read().await? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_are_trimmed_and_reread() {
        let dir = std::env::temp_dir().join(format!("sidekey-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (k, s) = (dir.join("key_id"), dir.join("secret"));
        std::fs::write(&k, "kid-1\n").unwrap();
        std::fs::write(&s, "sec-1\r\n").unwrap();
        let src = CredentialSource::from_config(
            &CredentialConfig {
                name: "primary".into(),
                key_id_file: Some(k.clone()),
                secret_file: Some(s.clone()),
                ..Default::default()
            },
            Provider::CloudruIam,
            FilePolicy::Allow,
        );
        assert!(src.uses_files());
        let first = src.read().await.unwrap();
        assert_eq!(first.id.expose(), "kid-1");
        assert_eq!(first.secret.expose(), "sec-1");
        std::fs::write(&s, "sec-2\n").unwrap();
        let second = src.read().await.unwrap();
        assert_eq!(second.secret.expose(), "sec-2");
        assert_ne!(first.fingerprint(), second.fingerprint());
        std::fs::write(&s, "\n").unwrap();
        assert!(matches!(src.read().await, Err(CredentialError::Empty(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn world_readable_files_are_refused_when_asked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sidekey-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "s\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cfg = CredentialConfig {
            name: "p".into(),
            key_id: Some("k".into()),
            secret_file: Some(path.clone()),
            ..Default::default()
        };
        let refuse = CredentialSource::from_config(&cfg, Provider::CloudruIam, FilePolicy::Refuse);
        assert!(matches!(refuse.read().await, Err(CredentialError::WorldReadable(_))));
        assert!(CredentialSource::from_config(&cfg, Provider::CloudruIam, FilePolicy::Warn)
            .read()
            .await
            .is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(refuse.read().await.is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
