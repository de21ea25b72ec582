//! Backups in an object store (`esserver backup --to s3://bucket/prefix`): the same layout,
//! manifest and algorithm as a target directory (`es_storage::backup`), with objects for
//! files. A backup's objects are written under `backups/<name>/`, and it is complete once its
//! `manifest.json` is stored, last; a backup cut off leaves objects without a manifest, which
//! the next backup removes. Sealed volumes are shared by the backups under `volumes/` and
//! stored once. Every object is stored with one PUT (whole or not at all).

use super::s3::{ObjectError, ObjectStore};
use super::S3Target;
use es_storage::backup::{is_pooled_name, BackupError, Meter, Sink, Source, MANIFEST_FILE_NAME};
use std::io::{self, Read};
use std::path::PathBuf;

const SERVER_ID_OBJECT: &str = "server-id";
const BACKUPS_PREFIX: &str = "backups/";
const VOLUMES_PREFIX: &str = "volumes/";

/// A backup target in an object store.
pub struct S3Backups {
    objects: ObjectStore,
    target: S3Target,
}

impl S3Backups {
    pub fn new(objects: ObjectStore, target: S3Target) -> S3Backups {
        S3Backups { objects, target }
    }

    fn key(&self, path: &str) -> String {
        self.target.key(path)
    }

    fn error(&self, what: String) -> impl FnOnce(ObjectError) -> BackupError {
        move |error| BackupError::Io {
            context: what,
            source: io::Error::other(error.to_string()),
        }
    }

    fn read_small(&self, path: &str) -> Result<Option<Vec<u8>>, BackupError> {
        let key = self.key(path);
        match self.objects.open(&key) {
            Ok(reader) => {
                let mut bytes = Vec::new();
                reader
                    .take(64 * 1024)
                    .read_to_end(&mut bytes)
                    .map_err(|source| BackupError::Io {
                        context: format!("cannot read {}", self.describe_key(&key)),
                        source,
                    })?;
                Ok(Some(bytes))
            }
            Err(ObjectError::NotFound) => Ok(None),
            Err(error) => Err(self
                .error(format!("cannot read {}", self.describe_key(&key)))(
                error
            )),
        }
    }

    fn describe_key(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.target.bucket)
    }

    /// Backup names under `backups/`, with whether their manifest is there.
    fn backups(&self) -> Result<Vec<(String, bool)>, BackupError> {
        let prefix = self.key(BACKUPS_PREFIX);
        let objects = self
            .objects
            .list(&prefix)
            .map_err(self.error(format!("cannot list {}", self.describe_key(&prefix))))?;
        let mut out: Vec<(String, bool)> = Vec::new();
        for (key, _) in objects {
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            let Some((name, file)) = rest.split_once('/') else {
                continue;
            };
            let manifest = file == MANIFEST_FILE_NAME;
            match out.iter_mut().find(|(known, _)| known == name) {
                Some(entry) => entry.1 |= manifest,
                None => out.push((name.to_owned(), manifest)),
            }
        }
        Ok(out)
    }
}

impl Source for S3Backups {
    fn describe(&self) -> String {
        self.target.to_string()
    }

    fn backup_names(&self) -> Result<Vec<String>, BackupError> {
        Ok(self
            .backups()?
            .into_iter()
            .filter(|(_, complete)| *complete)
            .map(|(name, _)| name)
            .collect())
    }

    fn open(&self, path: &str) -> Result<Box<dyn Read + '_>, BackupError> {
        let key = self.key(path);
        self.objects
            .open(&key)
            .map(|reader| reader as Box<dyn Read>)
            .map_err(self.error(format!("cannot read {}", self.describe_key(&key))))
    }
}

impl Sink for S3Backups {
    fn source(&self) -> &dyn Source {
        self
    }

    fn prepare(&self, server_id: &str) -> Result<(), BackupError> {
        match self.read_small(SERVER_ID_OBJECT)? {
            Some(existing) if String::from_utf8_lossy(&existing).trim() == server_id => {}
            Some(existing) => {
                return Err(BackupError::Refused(format!(
                    "{} holds the backups of server {}, not of this server ({server_id}): use \
                     another prefix",
                    self.target,
                    String::from_utf8_lossy(&existing).trim()
                )))
            }
            None => {
                let text = format!("{server_id}\n");
                let key = self.key(SERVER_ID_OBJECT);
                self.objects
                    .put(&key, &mut text.as_bytes(), text.len() as u64)
                    .map_err(self.error(format!("cannot write {}", self.describe_key(&key))))?;
            }
        }
        // What an interrupted backup left: objects of a backup without its manifest.
        for (name, complete) in self.backups()? {
            if complete {
                continue;
            }
            tracing::warn!(backup = %name, target = %self.target, "removing what an interrupted backup left");
            self.remove_prefix(&format!("{BACKUPS_PREFIX}{name}/"))?;
        }
        Ok(())
    }

    fn begin(&self, name: &str) -> Result<Option<PathBuf>, BackupError> {
        let manifest = format!("{BACKUPS_PREFIX}{name}/{MANIFEST_FILE_NAME}");
        if self.pooled_size(&manifest)?.is_some() {
            return Err(BackupError::Refused(format!(
                "a backup named {name} exists already in {}",
                self.target
            )));
        }
        Ok(None)
    }

    fn pooled_size(&self, path: &str) -> Result<Option<u64>, BackupError> {
        let key = self.key(path);
        self.objects
            .size(&key)
            .map_err(self.error(format!("cannot look at {}", self.describe_key(&key))))
    }

    fn put(
        &self,
        path: &str,
        input: &mut dyn Read,
        bytes: u64,
        meter: &mut Meter<'_>,
    ) -> Result<String, BackupError> {
        let key = self.key(path);
        let mut metered = Metered {
            inner: input,
            meter,
            stopped: false,
        };
        let result = self.objects.put(&key, &mut metered, bytes);
        if metered.stopped {
            return Err(BackupError::Interrupted);
        }
        let sha256 =
            result.map_err(self.error(format!("cannot store {}", self.describe_key(&key))))?;
        Ok(hex::encode(sha256))
    }

    fn complete(&self, name: &str, manifest: &[u8]) -> Result<(), BackupError> {
        let key = self.key(&format!("{BACKUPS_PREFIX}{name}/{MANIFEST_FILE_NAME}"));
        self.objects
            .put(&key, &mut &manifest[..], manifest.len() as u64)
            .map(|_| ())
            .map_err(self.error(format!("cannot store {}", self.describe_key(&key))))
    }

    fn remove_backup(&self, name: &str) -> Result<(), BackupError> {
        let manifest = self.key(&format!("{BACKUPS_PREFIX}{name}/{MANIFEST_FILE_NAME}"));
        self.objects
            .delete(&manifest)
            .map_err(self.error(format!("cannot remove {}", self.describe_key(&manifest))))?;
        self.remove_prefix(&format!("{BACKUPS_PREFIX}{name}/"))
    }

    fn pooled(&self) -> Result<Vec<(String, u64)>, BackupError> {
        let prefix = self.key(VOLUMES_PREFIX);
        let objects = self
            .objects
            .list(&prefix)
            .map_err(self.error(format!("cannot list {}", self.describe_key(&prefix))))?;
        Ok(objects
            .into_iter()
            .filter_map(|(key, bytes)| {
                let name = key.strip_prefix(&prefix)?;
                is_pooled_name(name).then(|| (format!("{VOLUMES_PREFIX}{name}"), bytes))
            })
            .collect())
    }

    fn remove_pooled(&self, path: &str) -> Result<(), BackupError> {
        let key = self.key(path);
        self.objects
            .delete(&key)
            .map_err(self.error(format!("cannot remove {}", self.describe_key(&key))))
    }
}

impl S3Backups {
    /// Removes every object under `path` (a backup's `backups/<name>/`).
    fn remove_prefix(&self, path: &str) -> Result<(), BackupError> {
        let prefix = self.key(path);
        let objects = self
            .objects
            .list(&prefix)
            .map_err(self.error(format!("cannot list {}", self.describe_key(&prefix))))?;
        for (key, _) in objects {
            self.objects
                .delete(&key)
                .map_err(self.error(format!("cannot remove {}", self.describe_key(&key))))?;
        }
        Ok(())
    }
}

/// A reader reporting its bytes to a backup's meter, and failing once the backup must stop.
struct Metered<'a, 'm> {
    inner: &'a mut dyn Read,
    meter: &'a mut Meter<'m>,
    stopped: bool,
}

impl Read for Metered<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.meter.check_stop().is_err() {
            self.stopped = true;
            return Err(io::Error::other("the backup was stopped"));
        }
        let n = self.inner.read(buf)?;
        self.meter.add_bytes(n as u64);
        Ok(n)
    }
}
