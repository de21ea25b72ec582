//! The server's configuration file, `EmbryoServer.ini`.
//!
//! The file has the sections of the original server (`[IncubatorTransport]`,
//! `[ViewerTransport]`, `[WebInterface]`, `[PublicApi]`) plus `[Storage]`, `[Limits]`,
//! `[Security]` and `[Server]`. Lines are `key = value`; comments are whole lines starting with `;` or `#`.
//! Sizes take a whole number of bytes or a suffix (`KiB`, `MiB`, `GiB` are powers of 1024;
//! `KB`, `MB`, `GB` powers of 1000); durations are whole milliseconds. Any key left out
//! keeps its default ([`Config::default`]).
//!
//! The parser is hand-written and bounded (files up to [`CONFIG_FILE_BYTES_MAX`], lines up to
//! [`CONFIG_LINE_BYTES_MAX`]). Every error names the file, the line (0 for the whole file)
//! and what is wrong, in words an administrator can act on. [`Config::to_ini`] writes a
//! complete, commented file that parses back to the same configuration.

use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// Largest configuration file accepted, in bytes.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Longest line accepted, in bytes (without its line ending).
pub const CONFIG_LINE_BYTES_MAX: usize = 4096;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// The log levels `[Server] log_level` accepts, least verbose first.
const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// The whole configuration of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Incubator interface (NIC 2), section `[IncubatorTransport]`.
    pub incubator: IncubatorTransport,
    /// Viewer interface (NIC 1), section `[ViewerTransport]`.
    pub viewer: Listener,
    /// Web interface (NIC 1), section `[WebInterface]`.
    pub web: Listener,
    /// HTTPS on the web interface (`[WebInterface] tls`); plain HTTP only when turned off.
    pub web_tls: bool,
    /// Public API for EMR systems (NIC 1), section `[PublicApi]`.
    pub public_api: Listener,
    /// Section `[Storage]`.
    pub storage: StorageConfig,
    /// Section `[Limits]`.
    pub limits: Limits,
    /// Section `[Security]`.
    pub security: Security,
    /// Section `[Server]`.
    pub server: ServerSection,
    /// Section `[License]`.
    pub license: LicenseSection,
    /// Section `[IMS]`: instrument monitoring.
    pub ims: ImsConfig,
    /// Section `[TLS]`: the generated certificate.
    pub tls: TlsSection,
    /// Section `[Clinic]`: the site's name and time zone.
    pub clinic: ClinicSection,
    /// Section `[Backup]`: scheduled backups.
    pub backup: BackupSection,
    /// Section `[Archive]`: sealed volumes moved to an S3-compatible object store.
    pub archive: ArchiveSection,
}

/// Section `[Archive]`: the archive tier (`crate::archive`). Its `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ArchiveSection {
    /// `s3://bucket/prefix`. None (the default): no archive; volumes stay on the local disk.
    pub target: Option<crate::archive::S3Target>,
    /// The object store's URL (`https://minio.clinic.local:9000`). None: `AWS_ENDPOINT_URL`,
    /// else AWS S3 in `region`.
    pub endpoint: Option<String>,
    /// None: `AWS_REGION`, `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// None: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`: MinIO, Ceph, most self-hosted stores) or
    /// virtual-host style (`bucket.endpoint/key`: AWS). Default: path.
    pub virtual_host_style: bool,
    /// Sealed volumes older than this many days are archived (0: as soon as sealed).
    pub after_days: u64,
    /// Local cache of records read from the object store.
    pub cache_bytes_max: u64,
    /// Time allowed for one request to the object store.
    pub request_timeout_ms: u64,
    /// How often the archiver looks for volumes to archive.
    pub check_interval_ms: u64,
}

impl std::fmt::Debug for ArchiveSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveSection")
            .field("target", &self.target)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<set>"),
            )
            .field("virtual_host_style", &self.virtual_host_style)
            .field("after_days", &self.after_days)
            .field("cache_bytes_max", &self.cache_bytes_max)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("check_interval_ms", &self.check_interval_ms)
            .finish()
    }
}

impl Default for ArchiveSection {
    fn default() -> Self {
        ArchiveSection {
            target: None,
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            virtual_host_style: false,
            after_days: 90,
            cache_bytes_max: GIB,
            request_timeout_ms: 30_000,
            check_interval_ms: 600_000,
        }
    }
}

/// Section `[Backup]`: the backups the server takes itself, once a day.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupSection {
    /// The backup target directory (absolute). None (the default): no scheduled backups;
    /// `esserver backup --to DIR` still works.
    pub target: Option<crate::backup::Target>,
    /// When, in the clinic's time zone ([Clinic] time_zone): minutes after midnight.
    pub time_of_day_min: u32,
    /// Complete backups kept in the target; older ones are removed after a backup succeeds.
    pub keep: u32,
}

impl Default for BackupSection {
    fn default() -> Self {
        BackupSection {
            target: None,
            time_of_day_min: 2 * 60,
            keep: 7,
        }
    }
}

/// Section `[Clinic]`: what the original system took from the computer it ran on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClinicSection {
    /// The name new patients' `PatientIDx` begin with (`<site_name>_<serial day>`): letters,
    /// digits and `-`, at most 15, kept in capitals. Empty: the machine's host name.
    pub site_name: String,
    /// The IANA time zone (`Europe/Copenhagen`) the original Public API writes local times
    /// in, as the original did. Empty: the machine's zone. The REST API writes UTC.
    pub time_zone: String,
}

impl ClinicSection {
    /// The site name in use: the configured one, or the host name.
    pub fn site_name(&self) -> String {
        let name = if self.site_name.is_empty() {
            // The computer's own name, without its domain.
            crate::os::host_name()
                .and_then(|name| name.split('.').next().map(str::to_owned))
                .unwrap_or_default()
        } else {
            self.site_name.clone()
        };
        es_storage::tables::site_name(&name)
    }
}

/// Section `[TLS]`: what the self-signed certificate the server generates names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSection {
    /// Host names and IP addresses the certificate names (viewers' `Viewer_d.ini` holds IP
    /// addresses). Empty: the machine's host name, `localhost`, `esserver`, loopback and every
    /// address a listener binds (every address of the machine for 0.0.0.0 / ::).
    pub names: Vec<String>,
}

/// Section `[IMS]`: the monitoring queue and its uploader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImsConfig {
    /// Queue incubator telemetry and alarms for upload (`receive = on|off`, default on).
    pub receive: bool,
    /// Upload the queue (`upload = on|off`, default on); nothing is sent without `endpoint`.
    pub upload: bool,
    /// The vendor's monitoring endpoint. None (the default): upload stays off.
    pub endpoint: Option<crate::ims::Endpoint>,
    /// CA certificates (PEM) for an https endpoint; default: the system's bundle.
    pub ca_file: Option<PathBuf>,
    /// The queue's bound; when full, the oldest records are dropped (and counted).
    pub queue_bytes_max: u64,
    /// Records in one upload request at most.
    pub batch_records_max: u32,
    /// Time allowed for one upload request, ms.
    pub request_timeout_ms: u64,
    /// First wait after a failed upload, ms; doubled after each failure.
    pub retry_initial_ms: u64,
    /// Longest wait between failed uploads, ms.
    pub retry_max_ms: u64,
    /// How often an idle uploader looks at the queue, ms.
    pub upload_interval_ms: u64,
    /// Upload budget of each incubator, bits per second on the wire, backlog included
    /// (manual 4.2: 0.5 Mbit/s).
    pub incubator_budget_bits_per_s: u64,
}

impl Default for ImsConfig {
    fn default() -> Self {
        Self {
            receive: true,
            upload: true,
            endpoint: None,
            ca_file: None,
            queue_bytes_max: 256 * MIB,
            batch_records_max: 1000,
            request_timeout_ms: 30_000,
            retry_initial_ms: 2_000,
            retry_max_ms: 300_000,
            upload_interval_ms: 10_000,
            incubator_budget_bits_per_s: 500_000,
        }
    }
}

/// Section `[License]`: which licence signers the server trusts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LicenseSection {
    /// Ed25519 public keys (64 hex characters each) whose licences are accepted. Empty: the
    /// server makes a demo licence for itself on first start (a fresh installation works).
    pub trusted_keys: Vec<String>,
}

/// One listening port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    /// Address to listen on (chooses the network card).
    pub bind: IpAddr,
    /// TCP port; 0 asks the system for any free port (tests and benchmarks).
    pub port: u16,
    /// PEM certificate chain; with `key`, or neither (then a self-signed one is generated).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Event-loop threads; 0 = one per CPU core.
    pub workers: usize,
}

/// The incubator interface: the only port whose TLS may be turned off (isolated network).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncubatorTransport {
    /// Where and how it listens.
    pub listener: Listener,
    /// TLS on this port (`tls = on|off`, default on).
    pub tls: bool,
    /// How a serial number never seen is enrolled (`enrolment = open|approve`, default open).
    pub enrolment: es_storage::Enrolment,
}

/// Section `[Storage]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageConfig {
    /// Directory of the database, control socket and generated certificates. A relative
    /// path is relative to the server's current directory.
    pub data_dir: PathBuf,
    /// Memory for the database cache, bytes.
    pub cache_bytes: u64,
    /// Days the change log is kept; older cursors must resynchronise.
    pub change_log_retention_days: u32,
    /// Free disk space kept in reserve: uploads are refused before the disk is this full.
    pub reserve_bytes: u64,
    /// An image volume file is sealed (never written again) at this size, and the next begun.
    pub volume_bytes_max: u64,
    /// Write image records with O_DIRECT where the filesystem allows it
    /// (`volume_direct_io = on|off`, default on).
    pub volume_direct_io: bool,
    /// Save the database's allocator state with every commit, so a restart after a crash
    /// does not walk the whole index (`quick_repair = on|off`, default on).
    pub quick_repair: bool,
}

/// Section `[Limits]`: every bound of the data path, in one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest protocol frame, bytes.
    pub frame_bytes_max: u32,
    /// Open connections per listener.
    pub connections_max: u32,
    /// Open connections per listener from one IP address.
    pub connections_per_address_max: u32,
    /// Connections per listener that have not completed their handshake (TLS and HELLO or
    /// login); at the bound, the oldest is dropped for a new one.
    pub unauthenticated_connections_max: u32,
    /// Requests in flight per connection before the server stops reading it.
    pub inflight_requests_max: u32,
    /// Time allowed from accept to a completed handshake (TLS and HELLO), ms.
    pub handshake_timeout_ms: u64,
    /// A connection silent this long is closed, ms.
    pub idle_timeout_ms: u64,
    /// Write requests queued for the storage writer before sockets are paused.
    pub queue_requests_max: u32,
    /// Requests in one group commit.
    pub batch_requests_max: u32,
    /// Payload bytes in one group commit.
    pub batch_bytes_max: u64,
    /// Bytes read from one connection per event-loop turn.
    pub read_bytes_per_turn_max: u32,
    /// Time allowed for a graceful shutdown before connections are dropped, ms.
    pub shutdown_timeout_ms: u64,
}

/// Section `[Security]`: logins of viewer and API users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Security {
    /// Consecutive failed logins that lock an account.
    pub login_failures_max: u32,
    /// How long a locked account stays locked, ms.
    pub lockout_ms: u64,
    /// How long a viewer session survives a dropped connection (resume with its token), ms.
    pub session_resume_ms: u64,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            login_failures_max: 5,
            lockout_ms: 15 * 60 * 1000,
            session_resume_ms: 10 * 60 * 1000,
        }
    }
}

/// Section `[Server]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSection {
    /// One of `error`, `warn`, `info`, `debug`, `trace`.
    pub log_level: String,
    /// Compute every embryo's blastomere-activity curve in the background as its images
    /// arrive (`crate::activity`, at idle priority). Default: on.
    pub activity: bool,
}

/// A configuration file that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    /// The file's name as given.
    pub file: String,
    /// Line number from 1; 0 when the problem is the file as a whole.
    pub line: u32,
    /// What is wrong, and what is expected instead.
    pub message: String,
}

impl Listener {
    fn local(port: u16) -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            cert: None,
            key: None,
            workers: 0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            incubator: IncubatorTransport {
                listener: Listener::local(3000),
                tls: true,
                enrolment: es_storage::Enrolment::Open,
            },
            viewer: Listener::local(3010),
            web: Listener::local(4010),
            web_tls: true,
            public_api: Listener::local(4000),
            storage: StorageConfig::default(),
            limits: Limits::default(),
            security: Security::default(),
            server: ServerSection {
                log_level: "info".to_owned(),
                activity: true,
            },
            license: LicenseSection::default(),
            tls: TlsSection::default(),
            ims: ImsConfig::default(),
            clinic: ClinicSection::default(),
            backup: BackupSection::default(),
            archive: ArchiveSection::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./es-data"),
            cache_bytes: 256 * MIB,
            change_log_retention_days: 30,
            reserve_bytes: GIB,
            volume_bytes_max: 4 * GIB,
            volume_direct_io: true,
            quick_repair: true,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            frame_bytes_max: 4 * MIB as u32,
            connections_max: 1024,
            connections_per_address_max: 64,
            unauthenticated_connections_max: 256,
            inflight_requests_max: es_proto::incubator::INFLIGHT_REQUESTS_MAX_DEFAULT,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            queue_requests_max: 8192,
            batch_requests_max: 4096,
            batch_bytes_max: 64 * MIB,
            read_bytes_per_turn_max: 256 * KIB as u32,
            shutdown_timeout_ms: 10_000,
        }
    }
}

impl Config {
    /// Parses the text of a configuration file; `file_name` is used in error messages.
    pub fn parse(text: &str, file_name: &str) -> Result<Config, ConfigError> {
        if text.len() as u64 > CONFIG_FILE_BYTES_MAX {
            return Err(file_error(file_name, 0, file_too_large(text.len() as u64)));
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut parser = Parser::new(file_name);
        for (index, raw) in text.split('\n').enumerate() {
            let number = u32::try_from(index + 1).unwrap_or(u32::MAX);
            parser.line(raw.strip_suffix('\r').unwrap_or(raw), number)?;
        }
        parser.finish()
    }

    /// Reads and parses a configuration file. A relative `data_dir` stays relative (to the
    /// server's current directory).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file_name = path.display().to_string();
        let text =
            read_bounded(path).map_err(|(line, message)| file_error(&file_name, line, message))?;
        Config::parse(&text, &file_name)
    }

    /// A complete, commented configuration file that parses back to `self`.
    pub fn to_ini(&self) -> String {
        let mut out = String::from(FILE_HEADER);
        for section in Section::ALL {
            out.push('\n');
            out.push_str(&format!("[{}]\n", section.name()));
            out.push_str(&format!("; {}\n", section.doc()));
            self.write_section(section, &mut out);
        }
        out
    }

    fn listener(&self, section: Section) -> Option<&Listener> {
        match section {
            Section::IncubatorTransport => Some(&self.incubator.listener),
            Section::ViewerTransport => Some(&self.viewer),
            Section::WebInterface => Some(&self.web),
            Section::PublicApi => Some(&self.public_api),
            Section::Storage
            | Section::Limits
            | Section::Security
            | Section::Server
            | Section::License
            | Section::Ims
            | Section::Tls
            | Section::Clinic
            | Section::Backup
            | Section::Archive => None,
        }
    }

    fn listener_mut(&mut self, section: Section) -> Option<&mut Listener> {
        match section {
            Section::IncubatorTransport => Some(&mut self.incubator.listener),
            Section::ViewerTransport => Some(&mut self.viewer),
            Section::WebInterface => Some(&mut self.web),
            Section::PublicApi => Some(&mut self.public_api),
            Section::Storage
            | Section::Limits
            | Section::Security
            | Section::Server
            | Section::License
            | Section::Ims
            | Section::Tls
            | Section::Clinic
            | Section::Backup
            | Section::Archive => None,
        }
    }

    fn write_section(&self, section: Section, out: &mut String) {
        if let Some(listener) = self.listener(section) {
            write_listener(section, listener, out);
        }
        match section {
            Section::IncubatorTransport => {
                out.push_str("; TLS on this port: on or off. Only this port may turn it off,\n");
                out.push_str("; because the incubator network is isolated.\n");
                let tls = if self.incubator.tls { "on" } else { "off" };
                out.push_str(&format!("tls = {tls}\n"));
                out.push_str(
                    "; New instruments: open (enrolled at their first connection) or approve\n",
                );
                out.push_str(
                    "; (refused as pending until `esserver instrument approve SERIAL` or the\n",
                );
                out.push_str("; web interface's Instruments page approves them).\n");
                out.push_str(&format!(
                    "enrolment = {}\n",
                    self.incubator.enrolment.as_str()
                ));
            }
            Section::WebInterface => {
                out.push_str(
                    "; HTTPS on this port: on or off. Off serves plain HTTP (session cookies\n",
                );
                out.push_str(
                    "; and passwords then cross the network in clear); only on a trusted link.\n",
                );
                let tls = if self.web_tls { "on" } else { "off" };
                out.push_str(&format!("tls = {tls}\n"));
            }
            Section::Storage => {
                out.push_str("; Directory of the database; relative to the current directory.\n");
                out.push_str(&format!(
                    "data_dir = {}\n",
                    ini_path(&self.storage.data_dir)
                ));
                write_numbers(STORAGE_NUMBERS, &self.storage, out);
                out.push_str(
                    "; Write image records with O_DIRECT (no copy into the page cache) where the\n",
                );
                out.push_str("; filesystem allows it: on or off.\n");
                let direct = if self.storage.volume_direct_io {
                    "on"
                } else {
                    "off"
                };
                out.push_str(&format!("volume_direct_io = {direct}\n"));
            }
            Section::Limits => write_numbers(LIMIT_NUMBERS, &self.limits, out),
            Section::Backup => {
                out.push_str(
                    "; Where the server puts its daily backups: an absolute directory path\n",
                );
                out.push_str("; (another disk, or a mounted network share). None: no scheduled\n");
                out.push_str("; backups (`esserver backup --to DIR` still works).\n");
                out.push_str("; Or s3://bucket/prefix, reached as [Archive] says.\n");
                match &self.backup.target {
                    Some(crate::backup::Target::Dir(path)) => {
                        out.push_str(&format!("target = {}\n", ini_path(path)));
                    }
                    Some(target) => out.push_str(&format!("target = {target}\n")),
                    None => out.push_str("; target = /mnt/backup/esserver\n"),
                }
                out.push_str("; When, in the clinic's time zone ([Clinic] time_zone): HH:MM.\n");
                out.push_str(&format!(
                    "time_of_day = {:02}:{:02}\n",
                    self.backup.time_of_day_min / 60,
                    self.backup.time_of_day_min % 60
                ));
                out.push_str("; Complete backups kept; older ones are removed after a new one\n");
                out.push_str("; succeeds. Allowed: 1 to 1000.\n");
                out.push_str(&format!("keep = {}\n", self.backup.keep));
            }
            Section::Archive => self.write_archive(out),
            Section::Security => write_numbers(SECURITY_NUMBERS, &self.security, out),
            Section::Server => {
                out.push_str(&format!("; One of {}.\n", LOG_LEVELS.join(", ")));
                out.push_str(&format!("log_level = {}\n", self.server.log_level));
                out.push_str(
                    "; Compute each embryo's blastomere-activity curve in the background as its\n",
                );
                out.push_str(
                    "; images arrive, at idle priority (docs/models.md): on or off. Off: curves\n",
                );
                out.push_str("; are computed when asked for.\n");
                out.push_str(&format!("activity = {}\n", switch(self.server.activity)));
            }
            Section::Clinic => {
                out.push_str(
                    "; The name new patients' PatientIDx begin with (<site_name>_<serial day>),\n",
                );
                out.push_str("; as the original's computer name: letters, digits and -, at most\n");
                out.push_str("; 15. None: the host name.\n");
                if self.clinic.site_name.is_empty() {
                    out.push_str("; site_name = IVFCLINIC\n");
                } else {
                    out.push_str(&format!("site_name = {}\n", self.clinic.site_name));
                }
                out.push_str(
                    "; IANA time zone the original Public API writes local times in, as the\n",
                );
                out.push_str("; original did (the REST API writes UTC). None: the machine's.\n");
                if self.clinic.time_zone.is_empty() {
                    out.push_str("; time_zone = Europe/Copenhagen\n");
                } else {
                    out.push_str(&format!("time_zone = {}\n", self.clinic.time_zone));
                }
            }
            Section::Tls => {
                out.push_str("; Host names and IP addresses (comma-separated) the self-signed\n");
                out.push_str(
                    "; certificate names; viewers connecting by IP address need theirs in\n",
                );
                out.push_str(
                    "; it. None: the host name, localhost, esserver, loopback and every\n",
                );
                out.push_str("; address the listeners bind. `esserver tls renew` makes it anew.\n");
                if self.tls.names.is_empty() {
                    out.push_str("; names = esserver.clinic.local, 192.168.1.10\n");
                } else {
                    out.push_str(&format!("names = {}\n", self.tls.names.join(", ")));
                }
            }
            Section::License => {
                out.push_str("; Ed25519 public keys (64 hex characters, comma-separated) whose\n");
                out.push_str("; licences this server accepts. None: a demo licence is made on\n");
                out.push_str("; first start, so a fresh installation works.\n");
                if self.license.trusted_keys.is_empty() {
                    out.push_str("; trusted_keys = <64 hex>, <64 hex>\n");
                } else {
                    out.push_str(&format!(
                        "trusted_keys = {}\n",
                        self.license.trusted_keys.join(", ")
                    ));
                }
            }
            Section::Ims => {
                out.push_str(
                    "; Queue incubator telemetry and alarms for the vendor's monitoring:\n",
                );
                out.push_str("; on or off. Patient data never enters the queue.\n");
                out.push_str(&format!("receive = {}\n", switch(self.ims.receive)));
                out.push_str("; Upload the queue to `endpoint`: on or off.\n");
                out.push_str(&format!("upload = {}\n", switch(self.ims.upload)));
                out.push_str(
                    "; http:// or https:// URL (port 80 or 443 unless given). None: no upload.\n",
                );
                match &self.ims.endpoint {
                    Some(endpoint) => out.push_str(&format!("endpoint = {}\n", endpoint.url())),
                    None => out.push_str("; endpoint = http://ims.example.com/upload\n"),
                }
                out.push_str(
                    "; CA certificates (PEM) for an https endpoint; default: the system's.\n",
                );
                match &self.ims.ca_file {
                    Some(path) => out.push_str(&format!("ca_file = {}\n", ini_path(path))),
                    None => out.push_str("; ca_file = /etc/ssl/certs/ca-certificates.crt\n"),
                }
                write_numbers(IMS_NUMBERS, &self.ims, out);
            }
            Section::ViewerTransport | Section::PublicApi => {}
        }
    }
}

impl Config {
    fn write_archive(&self, out: &mut String) {
        let archive = &self.archive;
        out.push_str("; Sealed image volumes older than after_days are moved to S3-compatible\n");
        out.push_str(
            "; object storage (AWS S3, MinIO, Ceph RGW): uploaded, read back and checked\n",
        );
        out.push_str("; before the local copy goes. None: no archive.\n");
        match &archive.target {
            Some(target) => out.push_str(&format!("target = {target}\n")),
            None => out.push_str("; target = s3://clinic-archive/esserver\n"),
        }
        out.push_str("; The object store's URL. None: AWS_ENDPOINT_URL, else AWS S3.\n");
        match &archive.endpoint {
            Some(endpoint) => out.push_str(&format!("endpoint = {endpoint}\n")),
            None => out.push_str("; endpoint = https://minio.clinic.local:9000\n"),
        }
        out.push_str("; None: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1.\n");
        match &archive.region {
            Some(region) => out.push_str(&format!("region = {region}\n")),
            None => out.push_str("; region = eu-north-1\n"),
        }
        out.push_str("; Credentials. None: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the\n");
        out.push_str("; environment. Keep this file readable by the service only when set.\n");
        match &archive.access_key_id {
            Some(key) => out.push_str(&format!("access_key_id = {key}\n")),
            None => out.push_str("; access_key_id = AKIA...\n"),
        }
        match &archive.secret_access_key {
            Some(secret) => out.push_str(&format!("secret_access_key = {secret}\n")),
            None => out.push_str("; secret_access_key = ...\n"),
        }
        out.push_str(
            "; path (endpoint/bucket/key: MinIO, Ceph) or virtual (bucket.endpoint/key).\n",
        );
        let style = if archive.virtual_host_style {
            "virtual"
        } else {
            "path"
        };
        out.push_str(&format!("url_style = {style}\n"));
        write_numbers(ARCHIVE_NUMBERS, archive, out);
    }
}

const FILE_HEADER: &str = "\
; EmbryoServer.ini: configuration of esserver.
;
; `key = value` lines under [Section] headers. Comments are whole lines starting with ; or #.
; Sizes are whole bytes or take a suffix: KiB, MiB, GiB (powers of 1024) or KB, MB, GB
; (powers of 1000). Durations are whole milliseconds. A key left out keeps its default.
";

fn file_error(file: &str, line: u32, message: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        line,
        message,
    }
}

fn file_too_large(bytes: u64) -> String {
    format!(
        "the file is {bytes} bytes; a configuration file may be at most {} (1 MiB)",
        CONFIG_FILE_BYTES_MAX
    )
}

/// Reads at most one byte more than allowed; errors carry a line number (0 = whole file).
fn read_bounded(path: &Path) -> Result<String, (u32, String)> {
    let file = File::open(path).map_err(|e| (0, format!("cannot open the file: {e}")))?;
    let mut bytes = Vec::new();
    file.take(CONFIG_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| (0, format!("cannot read the file: {e}")))?;
    if bytes.len() as u64 > CONFIG_FILE_BYTES_MAX {
        return Err((
            0,
            format!("the file is larger than {CONFIG_FILE_BYTES_MAX} bytes (1 MiB)"),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        let line = u32::try_from(line).unwrap_or(u32::MAX);
        (
            line,
            "the line is not valid UTF-8 text; save the file as UTF-8".to_owned(),
        )
    })
}

// ---------------------------------------------------------------------------------------
// Sections and keys

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    IncubatorTransport,
    ViewerTransport,
    WebInterface,
    PublicApi,
    Storage,
    Limits,
    Security,
    Server,
    License,
    Ims,
    Tls,
    Clinic,
    Backup,
    Archive,
}

/// Keys of every listener section.
const LISTENER_KEYS: [&str; 5] = ["bind", "port", "cert", "key", "workers"];

impl Section {
    const ALL: [Section; 14] = [
        Section::IncubatorTransport,
        Section::ViewerTransport,
        Section::WebInterface,
        Section::PublicApi,
        Section::Storage,
        Section::Limits,
        Section::Security,
        Section::Server,
        Section::License,
        Section::Ims,
        Section::Tls,
        Section::Clinic,
        Section::Backup,
        Section::Archive,
    ];

    fn name(self) -> &'static str {
        match self {
            Section::IncubatorTransport => "IncubatorTransport",
            Section::ViewerTransport => "ViewerTransport",
            Section::WebInterface => "WebInterface",
            Section::PublicApi => "PublicApi",
            Section::Storage => "Storage",
            Section::Limits => "Limits",
            Section::Security => "Security",
            Section::Server => "Server",
            Section::License => "License",
            Section::Ims => "IMS",
            Section::Tls => "TLS",
            Section::Clinic => "Clinic",
            Section::Backup => "Backup",
            Section::Archive => "Archive",
        }
    }

    fn doc(self) -> &'static str {
        match self {
            Section::IncubatorTransport => {
                "Incubator interface (NIC 2, the isolated incubator LAN)."
            }
            Section::ViewerTransport => {
                "Viewer interface (NIC 1); must match the viewers' Viewer_d.ini [Servers]."
            }
            Section::WebInterface => "Web interface (NIC 1), e.g. to install a new licence.",
            Section::PublicApi => "Public API for EMR and data-warehouse systems (NIC 1).",
            Section::Storage => "Where and how data is stored.",
            Section::Limits => {
                "Bounds of the data path; the server stops reading rather than exceed them."
            }
            Section::Security => "Logins of viewer and API users.",
            Section::Server => "The server process.",
            Section::License => "Licences: the signers this server trusts.",
            Section::Ims => "Instrument monitoring (IMS): the telemetry queue and its uploader.",
            Section::Tls => "The TLS certificate the server generates for itself.",
            Section::Clinic => "The site: its name in patient identifiers and its time zone.",
            Section::Backup => "Scheduled backups (docs/operations.md).",
            Section::Archive => {
                "The archive tier: old sealed volumes in S3-compatible object storage \
                 (docs/operations.md)."
            }
        }
    }

    fn from_name(name: &str) -> Option<Section> {
        Section::ALL.into_iter().find(|s| s.name() == name)
    }

    fn is_listener(self) -> bool {
        matches!(
            self,
            Section::IncubatorTransport
                | Section::ViewerTransport
                | Section::WebInterface
                | Section::PublicApi
        )
    }

    fn keys(self) -> Vec<&'static str> {
        match self {
            Section::IncubatorTransport => LISTENER_KEYS
                .iter()
                .copied()
                .chain(["tls", "enrolment"])
                .collect(),
            Section::WebInterface => LISTENER_KEYS.iter().copied().chain(["tls"]).collect(),
            Section::ViewerTransport | Section::PublicApi => LISTENER_KEYS.to_vec(),
            Section::Storage => ["data_dir", "volume_direct_io", "quick_repair"]
                .into_iter()
                .chain(STORAGE_NUMBERS.iter().map(|k| k.name))
                .collect(),
            Section::Limits => LIMIT_NUMBERS.iter().map(|k| k.name).collect(),
            Section::Security => SECURITY_NUMBERS.iter().map(|k| k.name).collect(),
            Section::Server => vec!["log_level", "activity"],
            Section::License => vec!["trusted_keys"],
            Section::Tls => vec!["names"],
            Section::Clinic => vec!["site_name", "time_zone"],
            Section::Backup => vec!["target", "time_of_day", "keep"],
            Section::Archive => [
                "target",
                "endpoint",
                "region",
                "access_key_id",
                "secret_access_key",
                "url_style",
            ]
            .into_iter()
            .chain(ARCHIVE_NUMBERS.iter().map(|k| k.name))
            .collect(),
            Section::Ims => ["receive", "upload", "endpoint", "ca_file"]
                .into_iter()
                .chain(IMS_NUMBERS.iter().map(|k| k.name))
                .collect(),
        }
    }
}

/// How a numeric key is written and shown.
#[derive(Clone, Copy, Debug)]
enum Unit {
    Count,
    Bytes,
    Millis,
    Days,
}

impl Unit {
    fn show(self, value: u64) -> String {
        match self {
            Unit::Count => value.to_string(),
            Unit::Bytes => format_size(value),
            Unit::Millis => format!("{value} ms"),
            Unit::Days if value == 1 => "1 day".to_owned(),
            Unit::Days => format!("{value} days"),
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Unit::Count => "a whole number, e.g. `8`",
            Unit::Bytes => {
                "a size: whole bytes, or a whole number with KiB, MiB, GiB (powers of 1024) \
                 or KB, MB, GB (powers of 1000), e.g. `256 MiB`"
            }
            Unit::Millis => "a whole number of milliseconds, e.g. `10000`",
            Unit::Days => "a whole number of days, e.g. `30`",
        }
    }
}

/// A numeric key: its allowed range and where it lives in the configuration.
struct NumberKey<T> {
    name: &'static str,
    unit: Unit,
    min: u64,
    max: u64,
    doc: &'static str,
    get: fn(&T) -> u64,
    set: fn(&mut T, u64),
}

impl<T> NumberKey<T> {
    fn parse(&self, value: &str) -> Result<u64, String> {
        let number = match self.unit {
            Unit::Bytes => parse_size(value),
            Unit::Count | Unit::Millis | Unit::Days => parse_whole(value),
        }
        .ok_or_else(|| bad_value(self.unit.expected(), value))?;
        if number < self.min || number > self.max {
            return Err(format!(
                "{} is out of range; allowed {} to {}",
                self.unit.show(number),
                self.unit.show(self.min),
                self.unit.show(self.max)
            ));
        }
        Ok(number)
    }

    fn allowed(&self) -> String {
        format!(
            "{} to {}",
            self.unit.show(self.min),
            self.unit.show(self.max)
        )
    }
}

/// Narrows a value whose range check already guarantees it fits.
fn to_u32(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

const LISTENER_NUMBERS: &[NumberKey<Listener>] = &[
    NumberKey {
        name: "port",
        unit: Unit::Count,
        min: 0,
        max: 65_535,
        doc: "TCP port; 0 = any free port (tests), reported in server.json.",
        get: |l| u64::from(l.port),
        set: |l, v| l.port = u16::try_from(v).unwrap_or(u16::MAX),
    },
    NumberKey {
        name: "workers",
        unit: Unit::Count,
        min: 0,
        max: 256,
        doc: "Event-loop threads; 0 = one per CPU core.",
        get: |l| l.workers as u64,
        set: |l, v| l.workers = to_usize(v),
    },
];

const STORAGE_NUMBERS: &[NumberKey<StorageConfig>] = &[
    NumberKey {
        name: "cache_bytes",
        unit: Unit::Bytes,
        min: 0,
        max: TIB,
        doc: "Memory for the database cache.",
        get: |s| s.cache_bytes,
        set: |s, v| s.cache_bytes = v,
    },
    NumberKey {
        name: "change_log_retention_days",
        unit: Unit::Days,
        min: 1,
        max: 3650,
        doc: "Days the change log is kept; a client asking for older changes resynchronises.",
        get: |s| u64::from(s.change_log_retention_days),
        set: |s, v| s.change_log_retention_days = to_u32(v),
    },
    NumberKey {
        name: "reserve_bytes",
        unit: Unit::Bytes,
        min: 0,
        max: 16 * TIB,
        doc: "Free disk space kept in reserve: uploads are refused before the disk is this full.",
        get: |s| s.reserve_bytes,
        set: |s, v| s.reserve_bytes = v,
    },
    NumberKey {
        name: "volume_bytes_max",
        unit: Unit::Bytes,
        min: MIB,
        max: TIB,
        doc: "Size at which an image volume file is sealed (never written again) and the next \
              one begun. Sealed volumes are what backups copy once and archives move.",
        get: |s| s.volume_bytes_max,
        set: |s, v| s.volume_bytes_max = v,
    },
];

const IMS_NUMBERS: &[NumberKey<ImsConfig>] = &[
    NumberKey {
        name: "queue_bytes_max",
        unit: Unit::Bytes,
        min: 64 * KIB,
        max: 64 * GIB,
        doc: "The monitoring queue's bound; when full, its oldest records are dropped.",
        get: |s| s.queue_bytes_max,
        set: |s, v| s.queue_bytes_max = v,
    },
    NumberKey {
        name: "batch_records_max",
        unit: Unit::Count,
        min: 1,
        max: 10_000,
        doc: "Records in one upload request at most.",
        get: |s| u64::from(s.batch_records_max),
        set: |s, v| s.batch_records_max = to_u32(v),
    },
    NumberKey {
        name: "request_timeout_ms",
        unit: Unit::Millis,
        min: 100,
        max: 600_000,
        doc: "Time allowed for one upload request.",
        get: |s| s.request_timeout_ms,
        set: |s, v| s.request_timeout_ms = v,
    },
    NumberKey {
        name: "retry_initial_ms",
        unit: Unit::Millis,
        min: 10,
        max: 3_600_000,
        doc: "Wait after a failed upload; doubled after each further failure, with jitter.",
        get: |s| s.retry_initial_ms,
        set: |s, v| s.retry_initial_ms = v,
    },
    NumberKey {
        name: "retry_max_ms",
        unit: Unit::Millis,
        min: 10,
        max: 24 * 3_600_000,
        doc: "Longest wait between failed uploads.",
        get: |s| s.retry_max_ms,
        set: |s, v| s.retry_max_ms = v,
    },
    NumberKey {
        name: "upload_interval_ms",
        unit: Unit::Millis,
        min: 10,
        max: 3_600_000,
        doc: "How often an idle uploader looks for new records.",
        get: |s| s.upload_interval_ms,
        set: |s, v| s.upload_interval_ms = v,
    },
    NumberKey {
        name: "incubator_budget_bits_per_s",
        unit: Unit::Count,
        min: 8_000,
        max: 1_000_000_000,
        doc: "Upload budget of each incubator in bits per second on the wire, backlog included.",
        get: |s| s.incubator_budget_bits_per_s,
        set: |s, v| s.incubator_budget_bits_per_s = v,
    },
];

const ARCHIVE_NUMBERS: &[NumberKey<ArchiveSection>] = &[
    NumberKey {
        name: "after_days",
        unit: Unit::Days,
        min: 0,
        max: 36_500,
        doc: "Sealed volumes older than this are archived (0: as soon as they are sealed).",
        get: |s| s.after_days,
        set: |s, v| s.after_days = v,
    },
    NumberKey {
        name: "cache_bytes_max",
        unit: Unit::Bytes,
        min: MIB,
        max: 1024 * GIB,
        doc: "Local disk cache of records read back from the object store.",
        get: |s| s.cache_bytes_max,
        set: |s, v| s.cache_bytes_max = v,
    },
    NumberKey {
        name: "request_timeout_ms",
        unit: Unit::Millis,
        min: 100,
        max: 3_600_000,
        doc: "Time allowed for one request to the object store (a whole upload included).",
        get: |s| s.request_timeout_ms,
        set: |s, v| s.request_timeout_ms = v,
    },
    NumberKey {
        name: "check_interval_ms",
        unit: Unit::Millis,
        min: 100,
        max: 86_400_000,
        doc: "How often the archiver looks for volumes to archive.",
        get: |s| s.check_interval_ms,
        set: |s, v| s.check_interval_ms = v,
    },
];

const SECURITY_NUMBERS: &[NumberKey<Security>] = &[
    NumberKey {
        name: "login_failures_max",
        unit: Unit::Count,
        min: 1,
        max: 100,
        doc: "Consecutive failed logins that lock an account.",
        get: |s| u64::from(s.login_failures_max),
        set: |s, v| s.login_failures_max = to_u32(v),
    },
    NumberKey {
        name: "lockout_ms",
        unit: Unit::Millis,
        min: 1000,
        max: 7 * 24 * 3600 * 1000,
        doc: "How long a locked account stays locked.",
        get: |s| s.lockout_ms,
        set: |s, v| s.lockout_ms = v,
    },
    NumberKey {
        name: "session_resume_ms",
        unit: Unit::Millis,
        min: 1000,
        max: 24 * 3600 * 1000,
        doc: "How long a viewer session survives a dropped connection.",
        get: |s| s.session_resume_ms,
        set: |s, v| s.session_resume_ms = v,
    },
];

const LIMIT_NUMBERS: &[NumberKey<Limits>] = &[
    NumberKey {
        name: "frame_bytes_max",
        unit: Unit::Bytes,
        min: 64 * KIB,
        max: 64 * MIB,
        doc: "Largest protocol frame.",
        get: |l| u64::from(l.frame_bytes_max),
        set: |l, v| l.frame_bytes_max = to_u32(v),
    },
    NumberKey {
        name: "connections_max",
        unit: Unit::Count,
        min: 1,
        max: 65_536,
        doc: "Open connections per listener.",
        get: |l| u64::from(l.connections_max),
        set: |l, v| l.connections_max = to_u32(v),
    },
    NumberKey {
        name: "connections_per_address_max",
        unit: Unit::Count,
        min: 1,
        max: 65_536,
        doc: "Open connections per listener from one IP address; more are closed at accept \
              (viewers behind one NAT address share it).",
        get: |l| u64::from(l.connections_per_address_max),
        set: |l, v| l.connections_per_address_max = to_u32(v),
    },
    NumberKey {
        name: "unauthenticated_connections_max",
        unit: Unit::Count,
        min: 1,
        max: 65_536,
        doc: "Connections per listener that have not completed their handshake (TLS, then \
              HELLO or login); at the bound the oldest is dropped for a new one. Each event \
              loop of the listener keeps its share (the bound divided by its workers).",
        get: |l| u64::from(l.unauthenticated_connections_max),
        set: |l, v| l.unauthenticated_connections_max = to_u32(v),
    },
    NumberKey {
        name: "inflight_requests_max",
        unit: Unit::Count,
        min: 1,
        max: 65_536,
        doc: "Requests in flight per connection before the server stops reading it.",
        get: |l| u64::from(l.inflight_requests_max),
        set: |l, v| l.inflight_requests_max = to_u32(v),
    },
    NumberKey {
        name: "handshake_timeout_ms",
        unit: Unit::Millis,
        min: 100,
        max: 600_000,
        doc: "Time allowed from accept to a completed handshake (TLS and hello).",
        get: |l| l.handshake_timeout_ms,
        set: |l, v| l.handshake_timeout_ms = v,
    },
    NumberKey {
        name: "idle_timeout_ms",
        unit: Unit::Millis,
        min: 1_000,
        max: 86_400_000,
        doc: "A connection silent this long is closed.",
        get: |l| l.idle_timeout_ms,
        set: |l, v| l.idle_timeout_ms = v,
    },
    NumberKey {
        name: "queue_requests_max",
        unit: Unit::Count,
        min: 1,
        max: 1_048_576,
        doc: "Write requests queued for the storage writer before sockets are paused.",
        get: |l| u64::from(l.queue_requests_max),
        set: |l, v| l.queue_requests_max = to_u32(v),
    },
    NumberKey {
        name: "batch_requests_max",
        unit: Unit::Count,
        min: 1,
        max: 1_048_576,
        doc: "Requests in one group commit; at most queue_requests_max.",
        get: |l| u64::from(l.batch_requests_max),
        set: |l, v| l.batch_requests_max = to_u32(v),
    },
    NumberKey {
        name: "batch_bytes_max",
        unit: Unit::Bytes,
        min: 64 * KIB,
        max: 4 * GIB,
        doc: "Payload bytes in one group commit; at least frame_bytes_max.",
        get: |l| l.batch_bytes_max,
        set: |l, v| l.batch_bytes_max = v,
    },
    NumberKey {
        name: "read_bytes_per_turn_max",
        unit: Unit::Bytes,
        min: 4 * KIB,
        max: 16 * MIB,
        doc: "Bytes read from one connection per event-loop turn.",
        get: |l| u64::from(l.read_bytes_per_turn_max),
        set: |l, v| l.read_bytes_per_turn_max = to_u32(v),
    },
    NumberKey {
        name: "shutdown_timeout_ms",
        unit: Unit::Millis,
        min: 0,
        max: 600_000,
        doc: "Time allowed for a graceful shutdown before connections are dropped.",
        get: |l| l.shutdown_timeout_ms,
        set: |l, v| l.shutdown_timeout_ms = v,
    },
];

// ---------------------------------------------------------------------------------------
// Values

/// Digits only: no sign, no separators, no fraction.
fn parse_whole(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `4194304`, `4 MiB`, `4MiB`, `64 KB`; suffixes ignore ASCII case.
pub fn parse_size(text: &str) -> Option<u64> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number = parse_whole(&text[..digits_end])?;
    let multiplier = match text[digits_end..].trim().to_ascii_lowercase().as_str() {
        "" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// The largest binary unit that divides `bytes` exactly, so it parses back unchanged.
fn format_size(bytes: u64) -> String {
    for (unit, name) in [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes != 0 && bytes % unit == 0 {
            return format!("{} {name}", bytes / unit);
        }
    }
    bytes.to_string()
}

fn switch(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

fn parse_switch(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(bad_value("on or off (also true/false, yes/no)", text)),
    }
}

fn parse_ip(text: &str) -> Result<IpAddr, String> {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse().map_err(|_| {
        bad_value(
            "an IP address such as 0.0.0.0, 127.0.0.1 or :: (host names are not accepted)",
            text,
        )
    })
}

/// A path; one pair of surrounding double quotes is removed (for spaces at either end).
fn parse_path(text: &str, what: &str) -> Result<PathBuf, String> {
    let bare = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if bare.is_empty() {
        return Err(format!("expected {what}; the value is empty"));
    }
    Ok(PathBuf::from(bare))
}

/// A path as written by [`Config::to_ini`]: quoted when trimming or quotes would change it.
fn ini_path(path: &Path) -> String {
    let text = path.display().to_string();
    if text.trim() != text || text.starts_with('"') || text.is_empty() {
        format!("\"{text}\"")
    } else {
        text
    }
}

fn parse_log_level(text: &str) -> Result<String, String> {
    let level = text.to_ascii_lowercase();
    if LOG_LEVELS.contains(&level.as_str()) {
        Ok(level)
    } else {
        Err(bad_value(
            &format!("one of {}", LOG_LEVELS.join(", ")),
            text,
        ))
    }
}

fn bad_value(expected: &str, got: &str) -> String {
    let mut message = format!("expected {expected}; got `{got}`");
    if got.contains(';') || got.contains('#') {
        message.push_str(" (comments must be on a line of their own)");
    }
    message
}

// ---------------------------------------------------------------------------------------
// Parsing

/// Line-by-line parser state: the configuration so far and where each thing was set.
struct Parser<'a> {
    file: &'a str,
    config: Config,
    section: Option<Section>,
    section_lines: Vec<(Section, u32)>,
    key_lines: Vec<(Section, &'static str, u32)>,
}

impl<'a> Parser<'a> {
    fn new(file: &'a str) -> Self {
        Self {
            file,
            config: Config::default(),
            section: None,
            section_lines: Vec::new(),
            key_lines: Vec::new(),
        }
    }

    fn error(&self, line: u32, message: String) -> ConfigError {
        file_error(self.file, line, message)
    }

    fn line(&mut self, raw: &str, number: u32) -> Result<(), ConfigError> {
        if raw.len() > CONFIG_LINE_BYTES_MAX {
            let message = format!(
                "the line is {} bytes long; lines may be at most {CONFIG_LINE_BYTES_MAX} bytes",
                raw.len()
            );
            return Err(self.error(number, message));
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            return Ok(());
        }
        if line.starts_with('[') {
            return self.section_header(line, number);
        }
        self.key_value(line, number)
    }

    fn section_header(&mut self, line: &str, number: u32) -> Result<(), ConfigError> {
        let Some(inner) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) else {
            let message = format!("a section header must look like `[Storage]`; got `{line}`");
            return Err(self.error(number, message));
        };
        let name = inner.trim();
        let section =
            Section::from_name(name).ok_or_else(|| self.error(number, unknown_section(name)))?;
        if let Some(first) = self.section_line(section) {
            let message = format!(
                "section [{name}] appears twice (first at line {first}); \
                 put all its keys under one header"
            );
            return Err(self.error(number, message));
        }
        self.section_lines.push((section, number));
        self.section = Some(section);
        Ok(())
    }

    fn key_value(&mut self, line: &str, number: u32) -> Result<(), ConfigError> {
        let Some((key, value)) = line.split_once('=') else {
            let message = format!("missing `=`: expected `key = value`; got `{line}`");
            return Err(self.error(number, message));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(self.error(number, format!("missing key before `=` in `{line}`")));
        }
        let Some(section) = self.section else {
            let message = format!(
                "`{key}` is outside a section; put it under a section header such as [Storage]"
            );
            return Err(self.error(number, message));
        };
        let key = known_key(section, key).map_err(|m| self.error(number, m))?;
        if let Some(first) = self.key_line(section, key) {
            let message = format!(
                "`{key}` is set twice in [{}] (first at line {first})",
                section.name()
            );
            return Err(self.error(number, message));
        }
        self.key_lines.push((section, key, number));
        apply(&mut self.config, section, key, value)
            .map_err(|m| self.error(number, format!("[{}] {key}: {m}", section.name())))
    }

    fn section_line(&self, section: Section) -> Option<u32> {
        self.section_lines
            .iter()
            .find(|(s, _)| *s == section)
            .map(|(_, line)| *line)
    }

    fn key_line(&self, section: Section, key: &str) -> Option<u32> {
        self.key_lines
            .iter()
            .find(|(s, k, _)| *s == section && *k == key)
            .map(|(_, _, line)| *line)
    }

    /// The line a problem is reported at: its first key that was set, else its section's
    /// header, else 0 (all defaults).
    fn locate(&self, problem: &Problem) -> u32 {
        problem
            .keys
            .iter()
            .find_map(|key| self.key_line(problem.section, key))
            .or_else(|| self.section_line(problem.section))
            .unwrap_or(0)
    }

    fn finish(self) -> Result<Config, ConfigError> {
        match check(&self.config) {
            Ok(()) => Ok(self.config),
            Err(problem) => Err(self.error(self.locate(&problem), problem.message)),
        }
    }
}

fn unknown_section(name: &str) -> String {
    let valid: Vec<String> = Section::ALL
        .iter()
        .map(|s| format!("[{}]", s.name()))
        .collect();
    let mut message = format!(
        "unknown section [{name}]; valid sections: {}",
        valid.join(", ")
    );
    if let Some(near) = Section::ALL
        .iter()
        .find(|s| s.name().eq_ignore_ascii_case(name))
    {
        message.push_str(&format!(
            " (names are case-sensitive: did you mean [{}]?)",
            near.name()
        ));
    }
    message
}

/// The key's static name, or why it is not allowed in `section`.
fn known_key(section: Section, key: &str) -> Result<&'static str, String> {
    if key == "tls"
        && section.is_listener()
        && !matches!(section, Section::IncubatorTransport | Section::WebInterface)
    {
        return Err(
            "tls can only be turned off for [IncubatorTransport] and [WebInterface]; the viewer \
             port and the public API always use TLS"
                .to_owned(),
        );
    }
    let keys = section.keys();
    if let Some(known) = keys.iter().find(|k| **k == key) {
        return Ok(*known);
    }
    let mut message = format!(
        "unknown key `{key}` in [{}]; valid keys: {}",
        section.name(),
        keys.join(", ")
    );
    if let Some(near) = keys.iter().find(|k| k.eq_ignore_ascii_case(key)) {
        message.push_str(&format!(
            " (keys are case-sensitive: did you mean `{near}`?)"
        ));
    }
    Err(message)
}

/// Sets `key` of `section` from `value`; the key is known to belong to the section.
fn apply(config: &mut Config, section: Section, key: &str, value: &str) -> Result<(), String> {
    match (section, key) {
        (Section::IncubatorTransport, "tls") => config.incubator.tls = parse_switch(value)?,
        (Section::IncubatorTransport, "enrolment") => {
            config.incubator.enrolment = es_storage::Enrolment::parse(value)
                .ok_or_else(|| bad_value("open or approve", value))?;
        }
        (Section::WebInterface, "tls") => config.web_tls = parse_switch(value)?,
        (Section::Storage, "data_dir") => {
            config.storage.data_dir = parse_path(value, "a directory path")?;
        }
        (Section::Storage, "volume_direct_io") => {
            config.storage.volume_direct_io = parse_switch(value)?;
        }
        (Section::Storage, "quick_repair") => {
            config.storage.quick_repair = parse_switch(value)?;
        }
        (Section::Storage, _) => set_number(STORAGE_NUMBERS, &mut config.storage, key, value)?,
        (Section::Limits, _) => set_number(LIMIT_NUMBERS, &mut config.limits, key, value)?,
        (Section::Security, _) => {
            set_number(SECURITY_NUMBERS, &mut config.security, key, value)?;
        }
        (Section::Server, "activity") => config.server.activity = parse_switch(value)?,
        (Section::Server, _) => config.server.log_level = parse_log_level(value)?,
        (Section::License, _) => config.license.trusted_keys = parse_keys(value)?,
        (Section::Tls, _) => config.tls.names = parse_tls_names(value)?,
        (Section::Clinic, "site_name") => {
            let name = es_storage::tables::site_name(value);
            if !value.is_empty() && name != value.to_ascii_uppercase() {
                return Err(bad_value(
                    "letters, digits and -, at most 15, e.g. `IVFCLINIC`",
                    value,
                ));
            }
            config.clinic.site_name = value.to_owned();
        }
        (Section::Clinic, _) => {
            // Empty: the machine's zone.
            crate::times::clinic_zone(value)?;
            config.clinic.time_zone = value.to_owned();
        }
        (Section::Backup, "target") => {
            let target = crate::backup::Target::parse(value).map_err(|_| {
                bad_value("an absolute directory path or s3://bucket/prefix", value)
            })?;
            if let crate::backup::Target::Dir(path) = &target {
                parse_path(value, "an absolute directory path")?;
                debug_assert!(path.is_absolute());
            }
            config.backup.target = Some(target);
        }
        (Section::Backup, "time_of_day") => {
            config.backup.time_of_day_min = parse_time_of_day(value)?;
        }
        (Section::Backup, _) => {
            config.backup.keep = match value.parse::<u32>() {
                Ok(keep) if (1..=1000).contains(&keep) => keep,
                _ => return Err(bad_value("a whole number from 1 to 1000", value)),
            };
        }
        (Section::Archive, "target") => {
            config.archive.target = Some(crate::archive::S3Target::parse(value)?);
        }
        (Section::Archive, "endpoint") => {
            crate::archive::check_endpoint(value)?;
            config.archive.endpoint = Some(value.to_owned());
        }
        (Section::Archive, "region") => config.archive.region = Some(value.to_owned()),
        (Section::Archive, "access_key_id") => {
            config.archive.access_key_id = Some(value.to_owned());
        }
        (Section::Archive, "secret_access_key") => {
            config.archive.secret_access_key = Some(value.to_owned());
        }
        (Section::Archive, "url_style") => {
            config.archive.virtual_host_style = match value {
                "path" => false,
                "virtual" => true,
                _ => return Err(bad_value("path or virtual", value)),
            };
        }
        (Section::Archive, _) => {
            set_number(ARCHIVE_NUMBERS, &mut config.archive, key, value)?;
        }
        (Section::Ims, "receive") => config.ims.receive = parse_switch(value)?,
        (Section::Ims, "upload") => config.ims.upload = parse_switch(value)?,
        (Section::Ims, "endpoint") => {
            config.ims.endpoint = Some(crate::ims::Endpoint::parse(value)?);
        }
        (Section::Ims, "ca_file") => {
            config.ims.ca_file = Some(parse_path(value, "a CA certificate file path")?);
        }
        (Section::Ims, _) => set_number(IMS_NUMBERS, &mut config.ims, key, value)?,
        (_, _) => match config.listener_mut(section) {
            Some(listener) => apply_listener(listener, key, value)?,
            None => return Err(format!("`{key}` has no setter (a bug in esserver)")),
        },
    }
    Ok(())
}

/// `HH:MM` (24-hour clock) as minutes after midnight.
fn parse_time_of_day(value: &str) -> Result<u32, String> {
    let parsed = value.split_once(':').and_then(|(hours, minutes)| {
        let (hours, minutes) = (hours.parse::<u32>().ok()?, minutes.parse::<u32>().ok()?);
        (hours < 24 && minutes < 60 && value.len() == 5).then_some(hours * 60 + minutes)
    });
    parsed.ok_or_else(|| bad_value("a time of day HH:MM, e.g. 02:30", value))
}

/// A comma-separated list of Ed25519 public keys, 64 hex characters each.
/// Host names and IP addresses, comma-separated: each 1 to 253 bytes of letters, digits,
/// `.`, `-`, `:` (IPv6) or `*` (a wildcard label); at most 64.
fn parse_tls_names(value: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    if names.len() > 64 {
        return Err(format!("{} names; at most 64", names.len()));
    }
    for name in &names {
        let shape = name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'*'));
        if !shape {
            return Err(format!(
                "{name:?} is not a host name or IP address (letters, digits, '.', '-', ':')"
            ));
        }
    }
    Ok(names)
}

fn parse_keys(value: &str) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    for key in value.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "expected public keys of 64 hex characters, separated by commas; got `{key}`"
            ));
        }
        keys.push(key.to_ascii_lowercase());
    }
    Ok(keys)
}

fn apply_listener(listener: &mut Listener, key: &str, value: &str) -> Result<(), String> {
    match key {
        "bind" => listener.bind = parse_ip(value)?,
        "cert" => listener.cert = Some(parse_path(value, "a certificate file path")?),
        "key" => listener.key = Some(parse_path(value, "a private key file path")?),
        _ => set_number(LISTENER_NUMBERS, listener, key, value)?,
    }
    Ok(())
}

fn set_number<T>(
    keys: &[NumberKey<T>],
    target: &mut T,
    key: &str,
    value: &str,
) -> Result<(), String> {
    let rule = keys
        .iter()
        .find(|k| k.name == key)
        .ok_or_else(|| format!("`{key}` is not a numeric key (a bug in esserver)"))?;
    (rule.set)(target, rule.parse(value)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Checks across keys

/// A rule broken by a combination of keys; `keys` are tried in order to find the line.
struct Problem {
    section: Section,
    keys: &'static [&'static str],
    message: String,
}

fn check(config: &Config) -> Result<(), Problem> {
    for section in Section::ALL {
        if let Some(listener) = config.listener(section) {
            check_cert_pair(section, listener)?;
        }
    }
    check_distinct_listeners(config)?;
    check_limits(&config.limits)
}

fn check_cert_pair(section: Section, listener: &Listener) -> Result<(), Problem> {
    let (set, missing, keys): (&str, &str, &'static [&'static str]) =
        match (&listener.cert, &listener.key) {
            (Some(_), None) => ("cert", "key", &["cert"]),
            (None, Some(_)) => ("key", "cert", &["key"]),
            _ => return Ok(()),
        };
    Err(Problem {
        section,
        keys,
        message: format!(
            "[{}] sets `{set}` but not `{missing}`; give both the certificate and its private \
             key, or neither (then a self-signed certificate is generated)",
            section.name()
        ),
    })
}

fn check_distinct_listeners(config: &Config) -> Result<(), Problem> {
    let listeners: Vec<(Section, &Listener)> = Section::ALL
        .into_iter()
        .filter_map(|s| config.listener(s).map(|l| (s, l)))
        .collect();
    for (index, (later, b)) in listeners.iter().enumerate() {
        if let Some((earlier, a)) = listeners[..index].iter().find(|(_, a)| overlaps(a, b)) {
            return Err(Problem {
                section: *later,
                keys: &["port", "bind"],
                message: format!(
                    "[{}] listens on {} port {}, which [{}] already uses ({} port {}); \
                     give each listener its own port",
                    later.name(),
                    b.bind,
                    b.port,
                    earlier.name(),
                    a.bind,
                    a.port
                ),
            });
        }
    }
    Ok(())
}

/// Same port on the same address, or on any address when either listens on all of them.
fn overlaps(a: &Listener, b: &Listener) -> bool {
    a.port != 0
        && a.port == b.port
        && (a.bind == b.bind || a.bind.is_unspecified() || b.bind.is_unspecified())
}

fn check_limits(limits: &Limits) -> Result<(), Problem> {
    if limits.batch_bytes_max < u64::from(limits.frame_bytes_max) {
        return Err(Problem {
            section: Section::Limits,
            keys: &["batch_bytes_max", "frame_bytes_max"],
            message: format!(
                "batch_bytes_max ({}) is smaller than frame_bytes_max ({}); a group commit must \
                 hold at least one frame of the largest size",
                format_size(limits.batch_bytes_max),
                format_size(u64::from(limits.frame_bytes_max))
            ),
        });
    }
    if limits.batch_requests_max > limits.queue_requests_max {
        return Err(Problem {
            section: Section::Limits,
            keys: &["batch_requests_max", "queue_requests_max"],
            message: format!(
                "batch_requests_max ({}) is larger than queue_requests_max ({}); a group commit \
                 is taken from the queue, so it cannot be larger",
                limits.batch_requests_max, limits.queue_requests_max
            ),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Writing

fn write_listener(section: Section, listener: &Listener, out: &mut String) {
    let example = match section {
        Section::IncubatorTransport => "incubator",
        Section::ViewerTransport => "viewer",
        Section::WebInterface => "web",
        _ => "public-api",
    };
    out.push_str("; Address to listen on (chooses the network card); 0.0.0.0 = all.\n");
    out.push_str(&format!("bind = {}\n", listener.bind));
    out.push_str("; PEM certificate chain and private key: both or neither (then a\n");
    out.push_str("; self-signed certificate is generated in data_dir).\n");
    write_optional_path("cert", &listener.cert, &format!("{example}.crt"), out);
    write_optional_path("key", &listener.key, &format!("{example}.key"), out);
    write_numbers(LISTENER_NUMBERS, listener, out);
}

fn write_optional_path(key: &str, path: &Option<PathBuf>, example: &str, out: &mut String) {
    match path {
        Some(path) => out.push_str(&format!("{key} = {}\n", ini_path(path))),
        None => out.push_str(&format!("; {key} = {example}\n")),
    }
}

fn write_numbers<T>(keys: &[NumberKey<T>], source: &T, out: &mut String) {
    for key in keys {
        out.push_str(&format!("; {} Allowed: {}.\n", key.doc, key.allowed()));
        let value = (key.get)(source);
        let text = match key.unit {
            Unit::Bytes => format_size(value),
            Unit::Count | Unit::Millis | Unit::Days => value.to_string(),
        };
        out.push_str(&format!("{} = {text}\n", key.name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    const FILE: &str = "EmbryoServer.ini";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, FILE)
    }

    /// The error of `text`, checked to be at `line`; returns its message.
    fn error_at(text: &str, line: u32) -> String {
        let error = parse(text).expect_err("the text should be refused");
        assert_eq!(error.file, FILE);
        assert_eq!(error.line, line, "{error}");
        assert_eq!(
            error.to_string(),
            format!("{FILE}:{line}: {}", error.message)
        );
        error.message
    }

    const FULL: &str = "\
; a full configuration
[IncubatorTransport]
bind = 10.0.2.1
port = 3000
tls = off
enrolment = approve
workers = 2

[ViewerTransport]
bind = 0.0.0.0
port = 3010
cert = /etc/esserver/viewer.crt
key = /etc/esserver/viewer.key
workers = 4

[WebInterface]
bind = ::
port = 4010

# the EMR port
[PublicApi]
bind = 192.168.1.10
port = 4000

[Storage]
data_dir = /var/lib/esserver
cache_bytes = 1 GiB
change_log_retention_days = 90
reserve_bytes = 20 GB

[Limits]
frame_bytes_max = 8 MiB
connections_max = 2048
connections_per_address_max = 32
unauthenticated_connections_max = 128
inflight_requests_max = 64
handshake_timeout_ms = 5000
idle_timeout_ms = 60000
queue_requests_max = 16384
batch_requests_max = 1024
batch_bytes_max = 128 MiB
read_bytes_per_turn_max = 64 KiB
shutdown_timeout_ms = 30000

[Server]
log_level = debug

[License]
trusted_keys = 8F3A8A96143873732C3BA668A0C225868B20251A1DFD4CC4EA0F8AB9E36D5134, c0bb48ac58b87039c0bb48ac58b87039c0bb48ac58b87039c0bb48ac58b87039
";

    #[test]
    fn tls_names_are_host_names_or_addresses() {
        assert_eq!(
            parse_tls_names(" esserver.clinic.local, 192.168.1.10 ,fe80::1,").unwrap(),
            ["esserver.clinic.local", "192.168.1.10", "fe80::1"]
        );
        assert!(parse_tls_names("bad name").is_err());
        assert!(parse_tls_names("a/b").is_err());
        let many = vec!["h"; 65].join(",");
        assert!(parse_tls_names(&many).is_err());
    }

    #[test]
    fn defaults() {
        let config = Config::default();
        assert_eq!(config.incubator.listener.port, 3000);
        assert!(config.incubator.tls);
        assert_eq!(config.viewer.port, 3010);
        assert_eq!(config.public_api.port, 4000);
        assert_eq!(config.web.port, 4010);
        assert_eq!(config.web.bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(config.viewer.workers, 0);
        assert_eq!(config.storage.data_dir, PathBuf::from("./es-data"));
        assert_eq!(config.storage.cache_bytes, 256 * MIB);
        assert_eq!(config.storage.change_log_retention_days, 30);
        assert_eq!(config.storage.reserve_bytes, GIB);
        assert_eq!(config.limits.frame_bytes_max, 4 * 1024 * 1024);
        assert_eq!(config.limits.batch_bytes_max, 64 * MIB);
        assert_eq!(config.limits.read_bytes_per_turn_max, 256 * 1024);
        assert_eq!(config.server.log_level, "info");
    }

    #[test]
    fn empty_file_and_comments_only_give_the_defaults() {
        assert_eq!(parse(""), Ok(Config::default()));
        assert_eq!(parse("; nothing\n# here\n\n"), Ok(Config::default()));
        assert_eq!(parse("[Storage]\n"), Ok(Config::default()));
    }

    #[test]
    fn full_file() {
        let config = parse(FULL).unwrap();
        assert_eq!(
            config.incubator.listener.bind,
            "10.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert!(!config.incubator.tls);
        assert_eq!(config.incubator.enrolment, es_storage::Enrolment::Approve);
        assert_eq!(config.incubator.listener.workers, 2);
        assert_eq!(
            config.viewer.cert,
            Some(PathBuf::from("/etc/esserver/viewer.crt"))
        );
        assert_eq!(
            config.viewer.key,
            Some(PathBuf::from("/etc/esserver/viewer.key"))
        );
        assert_eq!(config.web.bind, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(config.storage.data_dir, PathBuf::from("/var/lib/esserver"));
        assert_eq!(config.storage.cache_bytes, GIB);
        assert_eq!(config.storage.change_log_retention_days, 90);
        assert_eq!(
            config.license.trusted_keys,
            [
                "8f3a8a96143873732c3ba668a0c225868b20251a1dfd4cc4ea0f8ab9e36d5134",
                "c0bb48ac58b87039c0bb48ac58b87039c0bb48ac58b87039c0bb48ac58b87039"
            ]
        );
        let message = error_at("[License]\ntrusted_keys = abc\n", 2);
        assert!(message.contains("64 hex characters"), "{message}");
        assert_eq!(config.storage.reserve_bytes, 20_000_000_000);
        assert_eq!(config.limits.frame_bytes_max, 8 * 1024 * 1024);
        assert_eq!(config.limits.connections_max, 2048);
        assert_eq!(config.limits.connections_per_address_max, 32);
        assert_eq!(config.limits.unauthenticated_connections_max, 128);
        assert_eq!(config.limits.inflight_requests_max, 64);
        assert_eq!(config.limits.handshake_timeout_ms, 5000);
        assert_eq!(config.limits.idle_timeout_ms, 60_000);
        assert_eq!(config.limits.queue_requests_max, 16_384);
        assert_eq!(config.limits.batch_requests_max, 1024);
        assert_eq!(config.limits.batch_bytes_max, 128 * MIB);
        assert_eq!(config.limits.read_bytes_per_turn_max, 64 * 1024);
        assert_eq!(config.limits.shutdown_timeout_ms, 30_000);
        assert_eq!(config.server.log_level, "debug");
    }

    #[test]
    fn unknown_section_lists_valid_ones() {
        let message = error_at("[Storage]\n\n[Database]\n", 3);
        assert!(
            message.starts_with("unknown section [Database]; valid sections: "),
            "{message}"
        );
        assert!(message.contains("[IncubatorTransport], [ViewerTransport], [WebInterface], [PublicApi], [Storage], [Limits], [Security], [Server], [License]"), "{message}");
        let message = error_at("[storage]\n", 1);
        assert!(message.contains("did you mean [Storage]?"), "{message}");
    }

    #[test]
    fn malformed_section_header() {
        let message = error_at("[Storage\n", 1);
        assert!(message.contains("must look like `[Storage]`"), "{message}");
    }

    #[test]
    fn unknown_key_lists_valid_keys() {
        let message = error_at("[Storage]\ndata_dir = x\ncache = 1 GiB\n", 3);
        assert_eq!(
            message,
            "unknown key `cache` in [Storage]; valid keys: data_dir, volume_direct_io, \
             quick_repair, cache_bytes, change_log_retention_days, reserve_bytes, \
             volume_bytes_max"
        );
        let message = error_at("[ViewerTransport]\nPort = 3010\n", 2);
        assert!(message.contains("did you mean `port`?"), "{message}");
    }

    #[test]
    fn key_outside_a_section() {
        let message = error_at("; header\nport = 3000\n[Storage]\n", 2);
        assert!(message.contains("`port` is outside a section"), "{message}");
    }

    #[test]
    fn missing_equals() {
        let message = error_at("[Limits]\nframe_bytes_max 4 MiB\n", 2);
        assert!(message.starts_with("missing `=`"), "{message}");
        error_at("[Limits]\n= 4 MiB\n", 2);
    }

    #[test]
    fn duplicate_key_and_section() {
        let message = error_at("[Limits]\nconnections_max = 1\n\nconnections_max = 2\n", 4);
        assert!(
            message.contains("set twice in [Limits] (first at line 2)"),
            "{message}"
        );
        let message = error_at("[Limits]\n[Server]\n[Limits]\n", 3);
        assert!(
            message.contains("appears twice (first at line 1)"),
            "{message}"
        );
    }

    #[test]
    fn bad_values_say_the_expected_form() {
        let message = error_at("[IncubatorTransport]\nenrolment = closed\n", 2);
        assert_eq!(
            message,
            "[IncubatorTransport] enrolment: expected open or approve; got `closed`"
        );
        let message = error_at("[PublicApi]\nport = http\n", 2);
        assert_eq!(
            message,
            "[PublicApi] port: expected a whole number, e.g. `8`; got `http`"
        );
        let message = error_at("[PublicApi]\nbind = localhost\n", 2);
        assert!(message.contains("expected an IP address"), "{message}");
        let message = error_at("[IncubatorTransport]\ntls = maybe\n", 2);
        assert!(message.contains("expected on or off"), "{message}");
        let message = error_at("[Limits]\nidle_timeout_ms = 2 min\n", 2);
        assert!(
            message.contains("whole number of milliseconds"),
            "{message}"
        );
        let message = error_at("[Storage]\ncache_bytes = 1.5 GiB\n", 2);
        assert!(message.contains("expected a size"), "{message}");
        let message = error_at("[Server]\nlog_level = verbose\n", 2);
        assert!(
            message.contains("one of error, warn, info, debug, trace"),
            "{message}"
        );
        let message = error_at("[Storage]\ndata_dir =\n", 2);
        assert!(message.contains("expected a directory path"), "{message}");
    }

    #[test]
    fn inline_comments_get_a_hint() {
        let message = error_at("[Limits]\nconnections_max = 10 ; ten\n", 2);
        assert!(
            message.contains("comments must be on a line of their own"),
            "{message}"
        );
    }

    #[test]
    fn out_of_range_values() {
        let message = error_at("[ViewerTransport]\nport = 65536\n", 2);
        assert_eq!(
            message,
            "[ViewerTransport] port: 65536 is out of range; allowed 0 to 65535"
        );
        let message = error_at("\n[Limits]\nframe_bytes_max = 16 KiB\n", 3);
        assert_eq!(
            message,
            "[Limits] frame_bytes_max: 16 KiB is out of range; allowed 64 KiB to 64 MiB"
        );
        error_at("[Limits]\nframe_bytes_max = 65 MiB\n", 2);
        error_at("[Storage]\nchange_log_retention_days = 0\n", 2);
        error_at("[Limits]\nbatch_bytes_max = 99999999999999999999\n", 2);
        error_at("[Storage]\ncache_bytes = 18446744073709551615 GiB\n", 2);
    }

    #[test]
    fn tls_only_for_the_incubator_port() {
        let message = error_at("[PublicApi]\ntls = off\n", 2);
        assert_eq!(
            message,
            "tls can only be turned off for [IncubatorTransport] and [WebInterface]; the viewer \
             port and the public API always use TLS"
        );
        assert!(!parse("[WebInterface]\ntls = off\n").unwrap().web_tls);
        assert!(Config::default().web_tls);
    }

    #[test]
    fn cert_and_key_both_or_neither() {
        let message = error_at("[WebInterface]\nport = 4010\ncert = web.crt\n", 3);
        assert!(message.contains("sets `cert` but not `key`"), "{message}");
        let message = error_at("[WebInterface]\nkey = web.key\n", 2);
        assert!(message.contains("sets `key` but not `cert`"), "{message}");
    }

    #[test]
    fn two_listeners_on_the_same_port() {
        let text = "[ViewerTransport]\nport = 3010\n[PublicApi]\nbind = 127.0.0.1\nport = 3010\n";
        let message = error_at(text, 5);
        assert!(
            message.contains(
                "[PublicApi] listens on 127.0.0.1 port 3010, which [ViewerTransport] already uses"
            ),
            "{message}"
        );
        // All addresses overlap a specific one.
        error_at("[WebInterface]\nbind = 0.0.0.0\nport = 3000\n", 3);
        // Different addresses may share a port.
        let text = "[IncubatorTransport]\nbind = 10.0.2.1\nport = 4000\n\
                    [PublicApi]\nbind = 192.168.1.10\nport = 4000\n";
        assert!(parse(text).is_ok());
    }

    #[test]
    fn inconsistent_limits() {
        let message = error_at(
            "[Limits]\nframe_bytes_max = 8 MiB\nbatch_bytes_max = 4 MiB\n",
            3,
        );
        assert!(
            message.contains("batch_bytes_max (4 MiB) is smaller than frame_bytes_max (8 MiB)"),
            "{message}"
        );
        let message = error_at("[Limits]\nqueue_requests_max = 100\n", 2);
        assert!(
            message.contains("batch_requests_max (4096) is larger than queue_requests_max (100)"),
            "{message}"
        );
    }

    #[test]
    fn bounded_input() {
        let line = format!("; {}\n", "x".repeat(CONFIG_LINE_BYTES_MAX));
        let message = error_at(&format!("[Server]\n{line}"), 2);
        assert!(message.contains("at most 4096 bytes"), "{message}");
        let ok_line = format!(";{}\n", "x".repeat(CONFIG_LINE_BYTES_MAX - 1));
        assert!(parse(&ok_line).is_ok());
        let huge = ok_line.repeat(300);
        let message = error_at(&huge, 0);
        assert!(message.contains("at most 1048576"), "{message}");
    }

    #[test]
    fn size_suffixes() {
        let cases = [
            ("65536", 65_536),
            ("64 KiB", 64 * KIB),
            ("64KiB", 64 * KIB),
            ("3 MiB", 3 * MIB),
            ("2 GiB", 2 * GIB),
            ("64 KB", 64_000),
            ("5 MB", 5_000_000),
            ("2 GB", 2_000_000_000),
            ("1 gib", GIB),
            ("0", 0),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Some(bytes), "{text}");
        }
        for bad in ["", "MiB", "1.5 MiB", "-1", "+1", "1 TiB", "1 MiBs", "1 000"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(format_size(256 * MIB), "256 MiB");
        assert_eq!(format_size(1536 * KIB), "1536 KiB");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
    }

    #[test]
    fn round_trip_of_defaults() {
        let text = Config::default().to_ini();
        assert_eq!(parse(&text), Ok(Config::default()));
        assert!(text.contains("[IncubatorTransport]\n"));
        assert!(text.contains("; cert = viewer.crt\n"));
    }

    #[test]
    fn round_trip_of_a_changed_configuration() {
        let mut config = parse(FULL).unwrap();
        config.web.cert = Some(PathBuf::from(" padded name.crt"));
        config.web.key = Some(PathBuf::from("\"quoted\".key"));
        config.storage.reserve_bytes = 20_000_000_001;
        config.limits.read_bytes_per_turn_max = 5000;
        let text = config.to_ini();
        assert_eq!(parse(&text), Ok(config), "{text}");
    }

    #[test]
    fn archive_section() {
        let config = parse(
            "[Archive]\ntarget = s3://clinic-archive/site1\nendpoint = http://127.0.0.1:9000\n\
             access_key_id = AK\nsecret_access_key = SK\nafter_days = 0\n\
             cache_bytes_max = 64 MiB\nurl_style = virtual\n",
        )
        .unwrap();
        let archive = &config.archive;
        assert_eq!(archive.target.as_ref().unwrap().bucket, "clinic-archive");
        assert_eq!(archive.target.as_ref().unwrap().prefix, "site1");
        assert_eq!(archive.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(archive.after_days, 0);
        assert_eq!(archive.cache_bytes_max, 64 * MIB);
        assert!(archive.virtual_host_style);
        assert_eq!(Config::default().archive.target, None);
        // The written file round-trips; the secret never shows in Debug output.
        let written = config.to_ini();
        assert_eq!(parse(&written).unwrap(), config);
        assert!(!format!("{config:?}").contains("SK"));
        assert!(
            written.contains("target = s3://clinic-archive/site1"),
            "{written}"
        );
        error_at("[Archive]\ntarget = /mnt/archive\n", 2);
        error_at("[Archive]\nendpoint = minio:9000\n", 2);
        error_at("[Archive]\nurl_style = dns\n", 2);
        error_at("[Archive]\nafter_days = -1\n", 2);
    }

    #[test]
    fn backup_section() {
        let config =
            parse("[Backup]\ntarget = /mnt/backup/es\ntime_of_day = 23:05\nkeep = 3\n").unwrap();
        assert_eq!(
            config.backup.target,
            Some(crate::backup::Target::Dir(PathBuf::from("/mnt/backup/es")))
        );
        let s3 = parse("[Backup]\ntarget = s3://clinic-backups/es\n").unwrap();
        assert_eq!(
            s3.backup.target.unwrap().to_string(),
            "s3://clinic-backups/es"
        );
        assert_eq!(config.backup.time_of_day_min, 23 * 60 + 5);
        assert_eq!(config.backup.keep, 3);
        assert_eq!(parse(&config.to_ini()), Ok(config));
        assert_eq!(Config::default().backup.target, None);
        error_at("[Backup]\ntarget = relative/dir\n", 2);
        error_at("[Backup]\ntime_of_day = 24:00\n", 2);
        error_at("[Backup]\ntime_of_day = 2:30\n", 2);
        error_at("[Backup]\nkeep = 0\n", 2);
    }

    #[test]
    fn monitoring_section() {
        let config = parse(
            "[IMS]\nreceive = on\nupload = off\nendpoint = https://ims.example.com:8443/in\n\
             ca_file = /etc/ims-ca.pem\nqueue_bytes_max = 1 GiB\nretry_max_ms = 60000\n",
        )
        .unwrap();
        let endpoint = config.ims.endpoint.clone().unwrap();
        assert_eq!((endpoint.https, endpoint.port), (true, 8443));
        assert!(!config.ims.upload && config.ims.receive);
        assert_eq!(config.ims.queue_bytes_max, GIB);
        assert_eq!(parse(&config.to_ini()), Ok(config));
        let defaults = Config::default().ims;
        assert_eq!(
            (defaults.endpoint, defaults.receive, defaults.upload),
            (None, true, true)
        );
        let error = error_at("[IMS]\n\nendpoint = ftp://x/\n", 3);
        assert!(error.contains("http:// or https://"), "{error}");
        error_at("[IMS]\nqueue_bytes_max = 1 KiB\n", 2);
        error_at("[IMS]\nupload = maybe\n", 2);
    }

    #[test]
    fn crlf_line_endings_and_byte_order_mark() {
        let text = FULL.replace('\n', "\r\n");
        assert_eq!(parse(&text), parse(FULL));
        let with_bom = format!("\u{feff}{text}");
        assert_eq!(parse(&with_bom), parse(FULL));
        error_at("[Storage]\r\n\r\nbogus = 1\r\n", 3);
    }

    #[test]
    fn whitespace_is_trimmed() {
        let config = parse("  [Limits]  \n\tconnections_max\t=\t77  \n").unwrap();
        assert_eq!(config.limits.connections_max, 77);
    }

    #[test]
    fn every_number_key_fits_its_field() {
        let mut config = Config::default();
        for key in LIMIT_NUMBERS {
            (key.set)(&mut config.limits, key.max);
            assert_eq!((key.get)(&config.limits), key.max, "{}", key.name);
        }
        for key in STORAGE_NUMBERS {
            (key.set)(&mut config.storage, key.max);
            assert_eq!((key.get)(&config.storage), key.max, "{}", key.name);
        }
        for key in LISTENER_NUMBERS {
            (key.set)(&mut config.viewer, key.max);
            assert_eq!((key.get)(&config.viewer), key.max, "{}", key.name);
        }
    }

    #[test]
    fn load_reads_a_file_and_reports_missing_ones() {
        let dir = std::env::temp_dir().join(format!("esserver-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("EmbryoServer.ini");
        std::fs::write(&path, "[Storage]\ndata_dir = data\n").unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.storage.data_dir, PathBuf::from("data"));
        std::fs::write(&path, b"[Server]\nlog_level = \xff\n").unwrap();
        let error = Config::load(&path).unwrap_err();
        assert_eq!(error.line, 2, "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
        let error = Config::load(&dir.join("missing.ini")).unwrap_err();
        assert_eq!(error.line, 0);
        assert!(error.message.starts_with("cannot open the file"), "{error}");
    }

    /// Any text, and any mutation of a valid file, parses to a configuration or to an error
    /// with a line number: never a panic (a seeded loop, so a failure replays).
    #[test]
    fn random_and_mutated_files_never_panic() {
        use rand::{Rng, SeedableRng};
        let seed = 0x5eed_c0f1_u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let valid = Config::default().to_ini();
        let alphabet = b"[]=;#\n\r\t abcdefghijklmnopqrstuvwxyzKMGBi0123456789.:-_/\\\xff\xc3";
        for case in 0..3000 {
            let mut bytes: Vec<u8> = if case % 2 == 0 {
                valid.as_bytes().to_vec()
            } else {
                (0..rng.random_range(0..400))
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect()
            };
            for _ in 0..rng.random_range(0..8) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = alphabet[rng.random_range(0..alphabet.len())],
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Err(error) = parse(&text) {
                assert!(!error.message.is_empty(), "seed {seed:#x} case {case}");
            }
        }
    }
}
