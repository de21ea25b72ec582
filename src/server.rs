//! Starting and stopping the server: storage, the storage writer, one worker pool per
//! listener, the control socket, and the `server.json` file that tells tools where the
//! listeners are.

use crate::api::{ApiService, ApiSettings};
use crate::config::{Config, Listener};
use crate::control::{ControlServer, Request, Response};
use crate::disk_guard::{DiskGuard, DiskState};
use crate::incubator::core::IncubatorShared;
use crate::incubator::{IncubatorService, Registry};
use crate::viewer::{Hub, ViewerService, ViewerSettings};
use crate::workers::Workers;
use es_net::{NetLimits, Pool, PoolConfig};
use es_proto::incubator::ServerLimits;
use es_storage::{Store, StoreOptions, WriterOptions};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Viewer sessions (connected or waiting for a resume) at most, over all users.
const VIEWER_SESSIONS_MAX: usize = 1024;

/// Jobs (password checks, reads, playback chunks) waiting for a worker thread at most.
const WORKER_QUEUE_MAX: usize = 1024;

/// What `server.json` in the data directory says about a running server.
pub const INFO_FILE: &str = "server.json";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the database in {path}: {detail}")]
    Storage { path: PathBuf, detail: String },
    #[error("TLS for {service}: {detail}")]
    Tls {
        service: &'static str,
        detail: String,
    },
    #[error(
        "cannot listen on {address} for the {service}: {source}{}",
        bind_hint(address, source)
    )]
    Bind {
        service: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the control socket in {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("licence: {detail}")]
    License { detail: String },
    #[error("cannot start the worker threads: {source}")]
    Workers { source: std::io::Error },
    #[error("cannot start the monitoring (IMS) uploader: {source}")]
    Ims { source: std::io::Error },
    #[error("[Archive]: {detail}")]
    Archive { detail: String },
    #[error("cannot start the disk space monitor: {source}")]
    DiskGuard { source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    InfoFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ListenerInfo {
    pub service: String,
    pub address: SocketAddr,
    pub tls: bool,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ServerInfo {
    pub pid: u32,
    pub server_id: String,
    pub data_dir: PathBuf,
    pub certificate: PathBuf,
    pub listeners: Vec<ListenerInfo>,
}

impl ServerInfo {
    pub fn listener(&self, service: &str) -> Option<&ListenerInfo> {
        self.listeners.iter().find(|l| l.service == service)
    }
}

pub struct RunningServer {
    store: Store,
    writer: es_storage::Writer,
    workers: Workers,
    pools: Vec<(Pool, ListenerInfo)>,
    control: Option<ControlServer>,
    disk_guard: Option<DiskGuard>,
    ims: Option<crate::ims::Ims>,
    backups: Arc<crate::backup::Backups>,
    scheduler: Option<crate::backup::Scheduler>,
    archive: Option<Arc<crate::archive::Archive>>,
    activity: Option<Arc<crate::activity::Background>>,
    disk: Arc<DiskState>,
    licensing: Arc<crate::license::Licensing>,
    info_path: PathBuf,
}

/// Opens storage and starts every listener; returns once everything is bound.
pub fn start(config: &Config) -> Result<RunningServer, StartError> {
    let data_dir = config.storage.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| StartError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    if let Err(error) = crate::os::make_owner_only(&data_dir, true) {
        tracing::warn!(path = %data_dir.display(), %error,
            "cannot restrict the data directory to its owner; the control socket inside it relies on that");
    }
    check_open_files_limit(config);
    let (certificate, tls) = server_tls(config)?;
    let store = open_store(config)?;
    let licensing = Arc::new(
        crate::license::Licensing::load(
            &data_dir,
            &config.license.trusted_keys,
            &store.server_id(),
            crate::now_ms(),
        )
        .map_err(|detail| StartError::License { detail })?,
    );
    let disk = Arc::new(crate::disk_guard::DiskState::default());
    let disk_guard = DiskGuard::start(data_dir.clone(), config.storage.reserve_bytes, disk.clone())
        .map_err(|source| StartError::DiskGuard { source })?;
    let writer = store.start_writer(WriterOptions {
        queue_requests_max: config.limits.queue_requests_max as usize,
        batch_requests_max: config.limits.batch_requests_max as usize,
        batch_bytes_max: config.limits.batch_bytes_max,
    });
    let registry = Arc::new(Registry::default());
    let limits = net_limits(config);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let workers = match Workers::start("es-worker", threads, WORKER_QUEUE_MAX) {
        Ok(workers) => workers,
        Err(source) => {
            writer.shutdown();
            disk_guard.stop();
            return Err(StartError::Workers { source });
        }
    };
    let ims = match crate::ims::Ims::start(&config.ims, store.clone(), writer.clone()) {
        Ok(ims) => ims,
        Err(source) => {
            workers.shutdown();
            writer.shutdown();
            disk_guard.stop();
            return Err(StartError::Ims { source });
        }
    };
    let ims_shared = ims.shared();
    let archive = match &config.archive.target {
        None => None,
        Some(_) => {
            match crate::archive::Archive::start(&config.archive, &store, &writer, &data_dir) {
                Ok(archive) => Some(Arc::new(archive)),
                Err(detail) => {
                    ims.stop();
                    workers.shutdown();
                    writer.shutdown();
                    disk_guard.stop();
                    return Err(StartError::Archive { detail });
                }
            }
        }
    };
    let activity = if config.server.activity {
        match crate::activity::Background::start(&store, &writer) {
            Ok(background) => Some(Arc::new(background)),
            Err(error) => {
                tracing::error!(%error, "activity curves are computed only when asked for");
                None
            }
        }
    } else {
        tracing::info!("[Server] activity = off: activity curves are computed only when asked for");
        None
    };
    // From here on, a failure stops whatever was started (listeners, writer) before returning.
    let mut server = RunningServer {
        store: store.clone(),
        writer: writer.clone(),
        workers,
        pools: Vec::new(),
        control: None,
        disk_guard: Some(disk_guard),
        ims: Some(ims),
        backups: Arc::new(crate::backup::Backups::new(
            config.backup.target.clone(),
            config.archive.clone(),
        )),
        scheduler: None,
        archive,
        activity,
        disk: disk.clone(),
        licensing: licensing.clone(),
        info_path: data_dir.join(INFO_FILE),
    };
    let started = start_services(
        &mut server,
        config,
        certificate,
        tls,
        registry,
        limits,
        disk,
        licensing,
        ims_shared,
    );
    match started {
        Ok(()) => Ok(server),
        Err(error) => {
            server.shutdown();
            Err(error)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn start_services(
    server: &mut RunningServer,
    config: &Config,
    certificate: PathBuf,
    tls: Arc<rustls::ServerConfig>,
    registry: Arc<Registry>,
    limits: NetLimits,
    disk: Arc<DiskState>,
    licensing: Arc<crate::license::Licensing>,
    ims: Arc<crate::ims::ImsShared>,
) -> Result<(), StartError> {
    let data_dir = config.storage.data_dir.clone();
    let store = server.store.clone();
    let writer = server.writer.clone();
    let pools = &mut server.pools;

    let incubator_tls = if config.incubator.tls {
        Some(listener_tls("incubator", &config.incubator.listener, &tls)?)
    } else {
        None
    };
    if !config.incubator.tls {
        tracing::warn!("the incubator port runs WITHOUT TLS (tls = off in [IncubatorTransport]): \
            images and instrument secrets cross the incubator network in clear; keep that network isolated");
    }
    let incubator = Arc::new(IncubatorService {
        shared: Arc::new(IncubatorShared {
            store: store.clone(),
            registry: registry.clone(),
            limits: ServerLimits {
                frame_bytes_max: config.limits.frame_bytes_max,
                inflight_requests_max: config.limits.inflight_requests_max,
            },
            disk: disk.clone(),
            licensing: licensing.clone(),
            ims: ims.clone(),
            enrolment: config.incubator.enrolment,
        }),
        writer: writer.clone(),
    });
    pools.push(start_pool(
        "incubator",
        &config.incubator.listener,
        incubator_tls,
        &limits,
        incubator,
    )?);
    let viewer = Arc::new(ViewerService::new(
        store.clone(),
        writer.clone(),
        server.workers.clone(),
        disk.clone(),
        licensing.clone(),
        ViewerSettings {
            limits: es_proto::viewer::ServerLimits::default(),
            login_failures_max: config.security.login_failures_max,
            lockout_ms: i64::try_from(config.security.lockout_ms).unwrap_or(i64::MAX),
            session_resume: Duration::from_millis(config.security.session_resume_ms),
            sessions_max: VIEWER_SESSIONS_MAX,
            activity_background: server.activity.is_some(),
        },
    ));
    let viewers = viewer.hub();
    pools.push(start_pool(
        "viewer",
        &config.viewer,
        Some(listener_tls("viewer", &config.viewer, &tls)?),
        &limits,
        viewer,
    )?);
    // The original Public API writes local times in the clinic's zone (checked when the
    // configuration was read).
    let time_zone =
        crate::times::clinic_zone(&config.clinic.time_zone).unwrap_or(jiff::tz::TimeZone::UTC);
    tracing::info!(
        time_zone = %crate::times::zone_name(&time_zone),
        site_name = %config.clinic.site_name(),
        "clinic"
    );
    // The public API and the web interface: one HTTP service, each with its own routes.
    let api_settings = ApiSettings {
        http: es_net::http::HttpLimits::default(),
        login_failures_max: config.security.login_failures_max,
        lockout_ms: i64::try_from(config.security.lockout_ms).unwrap_or(i64::MAX),
        time_zone: time_zone.clone(),
        activity_background: server.activity.is_some(),
    };
    let api = Arc::new(ApiService::new(
        store.clone(),
        writer.clone(),
        server.workers.clone(),
        disk.clone(),
        licensing.clone(),
        api_settings.clone(),
        crate::api::PublicApi,
    ));
    pools.push(start_pool(
        "public-api",
        &config.public_api,
        Some(listener_tls("public-api", &config.public_api, &tls)?),
        &limits,
        api,
    )?);
    let certificate_sha256 = es_net::tls::read_certificate(&certificate)
        .ok()
        .map(|der| es_net::tls::fingerprint(&der));
    let web_site = crate::web::WebContext {
        registry: registry.clone(),
        viewers: viewers.clone(),
        sessions: crate::api::auth::Tokens::default(),
        view: Default::default(),
        tls: config.web_tls,
        ims: ims.clone(),
        started_at_ms: crate::now_ms(),
        data_dir: data_dir.clone(),
        certificate_sha256,
        enrolment: config.incubator.enrolment,
        backups: server.backups.clone(),
        archive: server.archive.clone(),
        activity: server.activity.clone(),
    };
    let web = Arc::new(ApiService::new(
        store.clone(),
        writer.clone(),
        server.workers.clone(),
        disk.clone(),
        licensing.clone(),
        api_settings,
        web_site,
    ));
    let web_tls = if config.web_tls {
        Some(listener_tls("web", &config.web, &tls)?)
    } else {
        tracing::warn!(
            "the web interface runs WITHOUT TLS (tls = off in [WebInterface]): \
            administrators' passwords and session cookies cross the network in clear"
        );
        None
    };
    pools.push(start_pool("web", &config.web, web_tls, &limits, web)?);

    let status_context = StatusContext {
        store: store.clone(),
        writer: writer.clone(),
        registry,
        viewers,
        listeners: pools
            .iter()
            .map(|(pool, info)| (info.clone(), pool.stats().clone()))
            .collect(),
        started: Instant::now(),
        data_dir: data_dir.clone(),
        disk: disk.clone(),
        licensing: licensing.clone(),
        ims,
        backups: server.backups.clone(),
        archive: server.archive.clone(),
        activity: server.activity.clone(),
    };
    if let Some(target) = &config.backup.target {
        let scheduler = crate::backup::Scheduler::start(
            server.backups.clone(),
            store.clone(),
            data_dir.clone(),
            target.clone(),
            config.backup.time_of_day_min,
            config.backup.keep,
            time_zone.clone(),
        )
        .map_err(|source| StartError::Control {
            path: PathBuf::from(target.to_string()),
            source,
        })?;
        server.scheduler = Some(scheduler);
    }
    let control = ControlServer::start(&data_dir, move |request, progress| {
        status_context.handle(request, progress)
    })
    .map_err(|source| StartError::Control {
        path: data_dir.clone(),
        source,
    })?;
    server.control = Some(control);
    let info = ServerInfo {
        pid: std::process::id(),
        server_id: store.server_id(),
        data_dir: data_dir.clone(),
        certificate,
        listeners: server.pools.iter().map(|(_, info)| info.clone()).collect(),
    };
    write_info(&server.info_path, &info)
}

/// Every listener may hold `connections_max` connections (one descriptor each); the
/// database, certificates and control socket need a few more.
fn check_open_files_limit(config: &Config) {
    const OTHER_FILES: u64 = 64;
    let needed = 4 * config.limits.connections_max as u64 + OTHER_FILES;
    match crate::os::raise_open_files_limit() {
        Ok(limit) if limit < needed => tracing::warn!(
            limit, needed,
            "the open-files limit is below what [Limits] connections_max allows on the four listeners; \
             raise it (for example LimitNOFILE in the service unit) or lower connections_max"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open-files limit"),
    }
}

fn open_store(config: &Config) -> Result<Store, StartError> {
    let mut seed = [0u8; 16];
    getrandom::fill(&mut seed).map_err(|error| StartError::Storage {
        path: config.storage.data_dir.clone(),
        detail: format!("no randomness for the server id: {error}"),
    })?;
    let options = StoreOptions {
        cache_bytes: config.storage.cache_bytes,
        change_log_retention_ms: config.storage.change_log_retention_days as i64 * 24 * 3600 * 1000,
        volume_bytes_max: config.storage.volume_bytes_max,
        volume_direct_io: config.storage.volume_direct_io,
        quick_repair: config.storage.quick_repair,
        site_name: config.clinic.site_name(),
    };
    Store::open(&config.storage.data_dir, &options, seed).map_err(|error| StartError::Storage {
        path: config.storage.data_dir.clone(),
        detail: error.to_string(),
    })
}

/// The certificate of every TLS listener whose section names none (`cert`, `key`): the data
/// directory's self-signed one, generated on first start. A section's own pair replaces it
/// for that listener only ([`listener_tls`]).
/// What the generated certificate names: `[TLS] names`, or by default the host name,
/// `localhost`, `esserver`, loopback and every address a listener binds (every address of the
/// machine for one that binds 0.0.0.0 or ::), so viewers reach it by name or by IP address.
pub fn certificate_names(config: &Config) -> Vec<String> {
    if !config.tls.names.is_empty() {
        return config.tls.names.clone();
    }
    let mut names = vec!["localhost".to_string(), "esserver".to_string()];
    names.extend(crate::os::host_name());
    let mut addresses: Vec<std::net::IpAddr> = vec![
        std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ];
    let binds = [
        config.incubator.listener.bind,
        config.viewer.bind,
        config.web.bind,
        config.public_api.bind,
    ];
    if binds.iter().any(std::net::IpAddr::is_unspecified) {
        addresses.extend(crate::os::interface_addresses());
    }
    addresses.extend(binds.iter().filter(|b| !b.is_unspecified()));
    addresses.sort();
    addresses.dedup();
    names.extend(addresses.iter().map(ToString::to_string));
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.to_ascii_lowercase()));
    names
}

fn server_tls(config: &Config) -> Result<(PathBuf, Arc<rustls::ServerConfig>), StartError> {
    let names = certificate_names(config);
    let (cert, key, created) = es_net::tls::ensure_self_signed(&config.storage.data_dir, &names)
        .map_err(|error| StartError::Tls {
            service: "all listeners",
            detail: error.to_string(),
        })?;
    if created {
        tracing::info!(certificate = %cert.display(), "generated a self-signed TLS certificate");
    }
    let tls = es_net::tls::server_config(&cert, &key).map_err(|error| StartError::Tls {
        service: "all listeners",
        detail: error.to_string(),
    })?;
    if let Ok(der) = es_net::tls::read_certificate(&cert) {
        tracing::info!(certificate = %cert.display(), sha256 = %es_net::tls::fingerprint(&der), names = %names.join(", "), "TLS certificate");
        let missing = es_net::tls::names_missing(&der, &names);
        if !missing.is_empty() {
            tracing::warn!(certificate = %cert.display(), missing = %missing.join(", "),
                "the generated certificate does not name every address of this server; clients connecting by those fail verification: run `esserver tls renew` and restart");
        }
    }
    Ok((cert, tls))
}

/// A listener's own certificate when its section names one (`cert`, `key`), else the shared
/// one.
fn listener_tls(
    service: &'static str,
    listener: &Listener,
    shared: &Arc<rustls::ServerConfig>,
) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let (Some(cert), Some(key)) = (&listener.cert, &listener.key) else {
        return Ok(shared.clone());
    };
    let tls = es_net::tls::server_config(cert, key).map_err(|error| StartError::Tls {
        service,
        detail: error.to_string(),
    })?;
    if let Ok(der) = es_net::tls::read_certificate(cert) {
        tracing::info!(service, certificate = %cert.display(), sha256 = %es_net::tls::fingerprint(&der), "TLS certificate of this listener");
    }
    Ok(tls)
}

fn net_limits(config: &Config) -> NetLimits {
    let limits = &config.limits;
    NetLimits {
        connections_max: limits.connections_max,
        connections_per_address_max: limits.connections_per_address_max,
        unauthenticated_max: limits.unauthenticated_connections_max,
        input_bytes_max: limits.frame_bytes_max as usize + 64 * 1024,
        output_bytes_max: 8 * 1024 * 1024,
        read_bytes_per_turn_max: limits.read_bytes_per_turn_max as usize,
        handshake_timeout: Duration::from_millis(limits.handshake_timeout_ms),
        idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
        loop_queue_max: 65_536,
        shutdown_timeout: Duration::from_millis(limits.shutdown_timeout_ms),
    }
}

fn start_pool<S: es_net::Service>(
    service_name: &'static str,
    listener: &Listener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: &NetLimits,
    service: Arc<S>,
) -> Result<(Pool, ListenerInfo), StartError> {
    let address = SocketAddr::new(listener.bind, listener.port);
    let tls_on = tls.is_some();
    let config = PoolConfig {
        name: service_name.into(),
        bind: address,
        workers: listener.workers,
        limits: limits.clone(),
        tls,
    };
    let pool = Pool::start(config, service).map_err(|source| StartError::Bind {
        service: service_name,
        address,
        source,
    })?;
    let info = ListenerInfo {
        service: service_name.into(),
        address: pool.local_addr(),
        tls: tls_on,
    };
    tracing::info!(service = %service_name, address = %info.address.ip(), port = info.address.port(), tls = tls_on, "listening");
    Ok((pool, info))
}

fn write_info(path: &Path, info: &ServerInfo) -> Result<(), StartError> {
    let temporary = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(info).expect("plain data serialises");
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|source| StartError::InfoFile {
            path: path.to_path_buf(),
            source,
        })
}

impl RunningServer {
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.pools.iter().map(|(_, info)| info.clone()).collect()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// True while the server can do its work: the storage writer runs and the database
    /// reads (the watchdog is pinged only then).
    pub fn healthy(&self) -> bool {
        self.store.writer_running() && self.store.read().is_ok()
    }

    /// Applies what can change while the server runs from `reloaded` (the configuration read
    /// again; an error keeps every setting): the log level, `[Storage] reserve_bytes`, the
    /// IMS switches, and the licence file (read again). Says in the log what it applied and
    /// what needs a restart. Returns the configuration now in force.
    pub fn reload(&self, running: &Config, reloaded: Result<Config, String>) -> Config {
        let new = match reloaded {
            Ok(new) => new,
            Err(message) => {
                tracing::error!("reload refused: {message}; every setting in force is kept");
                return running.clone();
            }
        };
        let mut now = running.clone();
        let mut applied: Vec<String> = Vec::new();
        if new.server.log_level != running.server.log_level {
            match crate::logging::set_level(&new.server.log_level) {
                Ok(before) => {
                    applied.push(format!("log_level {before} -> {}", new.server.log_level));
                    now.server.log_level = new.server.log_level.clone();
                }
                Err(error) => tracing::error!("reload: {error}"),
            }
        }
        if new.storage.reserve_bytes != running.storage.reserve_bytes {
            self.disk.set_reserve_bytes(new.storage.reserve_bytes);
            applied.push(format!(
                "reserve_bytes {} -> {}",
                running.storage.reserve_bytes, new.storage.reserve_bytes
            ));
            now.storage.reserve_bytes = new.storage.reserve_bytes;
        }
        if let Some(ims) = &self.ims {
            let shared = ims.shared();
            for (part, name, before, after) in [
                (
                    crate::ims::Part::Receive,
                    "receive",
                    running.ims.receive,
                    new.ims.receive,
                ),
                (
                    crate::ims::Part::Upload,
                    "upload",
                    running.ims.upload,
                    new.ims.upload,
                ),
            ] {
                if before != after {
                    shared.set(part, after, "a reload (SIGHUP)");
                    applied.push(format!("[IMS] {name} {}", if after { "on" } else { "off" }));
                }
            }
            now.ims.receive = new.ims.receive;
            now.ims.upload = new.ims.upload;
        }
        match self.licensing.reread(crate::now_ms()) {
            Ok(license) => applied.push(format!("licence {} read again", license.license_id)),
            Err(error) => tracing::error!(
                "reload: the licence file does not verify ({error}); the licence in force is kept"
            ),
        }
        // Everything else is read at the start only.
        let restart = restart_needed(&now, &new);
        tracing::info!(
            applied = %if applied.is_empty() { "nothing".to_string() } else { applied.join(", ") },
            needs_restart = %if restart.is_empty() { "nothing".to_string() } else { restart.join(", ") },
            "configuration reloaded"
        );
        if !restart.is_empty() {
            tracing::warn!(
                "changed settings that apply only at the next start: {}",
                restart.join(", ")
            );
        }
        now
    }

    /// Graceful shutdown: stop accepting, let sessions finish what is in flight (every
    /// request already with the storage writer is committed and answered), then stop the
    /// writer after it has committed everything queued.
    pub fn shutdown(mut self) {
        // A backup in progress stops at its next chunk (the next one starts afresh).
        self.backups.stop();
        for (pool, _) in &self.pools {
            pool.begin_shutdown();
        }
        for (pool, info) in self.pools.drain(..) {
            pool.join();
            tracing::debug!(service = %info.service, "listener stopped");
        }
        self.workers.shutdown();
        if let Some(scheduler) = self.scheduler.take() {
            scheduler.stop();
        }
        if let Some(archive) = self.archive.take() {
            archive.stop();
        }
        if let Some(activity) = self.activity.take() {
            activity.stop();
        }
        if let Some(ims) = self.ims.take() {
            ims.stop();
        }
        self.writer.shutdown();
        if let Some(control) = self.control.take() {
            control.stop();
        }
        if let Some(guard) = self.disk_guard.take() {
            guard.stop();
        }
        let _ = std::fs::remove_file(&self.info_path);
    }
}

/// Reads `server.json` of a data directory (written once a server is listening).
pub fn read_info(data_dir: &Path) -> Option<ServerInfo> {
    let text = std::fs::read_to_string(data_dir.join(INFO_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

struct StatusContext {
    store: Store,
    writer: es_storage::Writer,
    registry: Arc<Registry>,
    viewers: Arc<Hub>,
    listeners: Vec<(ListenerInfo, Arc<es_net::PoolStats>)>,
    started: Instant,
    data_dir: PathBuf,
    disk: Arc<DiskState>,
    licensing: Arc<crate::license::Licensing>,
    ims: Arc<crate::ims::ImsShared>,
    backups: Arc<crate::backup::Backups>,
    archive: Option<Arc<crate::archive::Archive>>,
    activity: Option<Arc<crate::activity::Background>>,
}

impl StatusContext {
    fn handle(&self, request: Request, progress: crate::control::ProgressSink<'_>) -> Response {
        match request {
            Request::Status => self.status(),
            Request::Backup { to } => match crate::backup::Target::parse(&to) {
                Ok(target) => self
                    .backups
                    .run(&self.store, &target, &self.data_dir, progress),
                Err(message) => Response::error("invalid_input", message),
            },
            Request::ArchiveCheck { full } => match &self.archive {
                Some(archive) => archive.check(full, progress),
                None => Response::error(
                    "archive_off",
                    "no [Archive] target is configured in EmbryoServer.ini; nothing is archived",
                ),
            },
            Request::Archive => match &self.archive {
                Some(archive) => archive.run_now(progress),
                None => Response::error(
                    "archive_off",
                    "no [Archive] target is configured in EmbryoServer.ini; nothing is archived",
                ),
            },
            Request::Verify => crate::admin::verify_report(&self.store),
            Request::ResetSecret { serial } => crate::admin::reset_secret(&self.writer, &serial),
            Request::User { action } => {
                let disabled = match &action {
                    crate::control::UserRequest::Disable { name, .. } => Some(name.clone()),
                    _ => None,
                };
                let response = crate::admin::user(&self.writer, &self.store, action);
                if let (true, Some(name)) = (response.ok, disabled) {
                    let ended = self.viewers.disconnect_user(&name);
                    if ended > 0 {
                        tracing::info!(user = %name, connections = ended, "disabled account: its viewer connections were closed");
                    }
                }
                response
            }
            Request::ApiKey { action } => crate::admin::api_key(&self.writer, &self.store, action),
            Request::Model { action } => crate::admin::model(&self.writer, &self.store, action),
            Request::InstrumentRename {
                serial,
                display_name,
                by,
            } => crate::admin::instrument_rename(&self.writer, &serial, &display_name, &by),
            Request::InstrumentNumber { serial, number, by } => {
                crate::admin::instrument_number(&self.writer, &serial, number, &by)
            }
            Request::InstrumentApprove { serial, by } => crate::admin::approve_pending(
                &self.writer,
                &self.registry,
                &serial,
                &by,
                "esserver instrument",
            ),
            Request::Ims { action } => match action {
                crate::control::ImsRequest::Status => self.ims_status(),
                crate::control::ImsRequest::Set { part, on, by } => {
                    self.ims.set(part, on, &by);
                    self.ims_status()
                }
            },
            Request::LicenseInstall { text } => {
                match self.licensing.install(text.as_bytes(), crate::now_ms()) {
                    Ok(license) => {
                        let over = self.registry.over_limit(&self.licensing);
                        if let Some(warning) = &over {
                            tracing::warn!("{warning}");
                        }
                        Response::ok(serde_json::json!({
                            "message": format!(
                                "licence {} for {} ({}) installed; it applies now{}",
                                license.license_id,
                                license.clinic,
                                license.configuration.name(),
                                over.map_or_else(String::new, |w| format!(". WARNING: {w}"))
                            ),
                        }))
                    }
                    Err(error) => Response::error(error.code(), format!("not installed: {error}")),
                }
            }
        }
    }

    fn ims_status(&self) -> Response {
        match self.ims.status(&self.store, crate::now_ms()) {
            Ok(status) => Response::ok(serde_json::to_value(status).unwrap_or_default()),
            Err(error) => Response::error("storage_unavailable", error.to_string()),
        }
    }

    fn status(&self) -> Response {
        let storage = match self.store.read().and_then(|reader| reader.stats()) {
            Ok(stats) => serde_json::to_value(stats).unwrap_or_default(),
            Err(error) => return Response::error("storage_unavailable", error.to_string()),
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let incubators: Vec<_> = self
            .registry
            .snapshot()
            .into_iter()
            .map(|c| {
                let seconds = ((now_ms - c.connected_at_ms).max(1) as f64) / 1000.0;
                serde_json::json!({
                    "serial": c.serial, "model": c.model, "firmware": c.firmware, "peer": c.peer,
                    "connected_for_s": seconds.round(),
                    "images": c.images, "image_bytes": c.image_bytes, "duplicates": c.duplicates, "errors": c.errors,
                    "images_per_s": c.images as f64 / seconds,
                    "bytes_per_s": c.image_bytes as f64 / seconds,
                })
            })
            .collect();
        let listeners: Vec<_> = self
            .listeners
            .iter()
            .map(|(info, stats)| {
                serde_json::json!({
                    "service": info.service, "address": info.address.to_string(), "tls": info.tls,
                    "connections_open": stats.connections_open(), "connections_accepted": stats.connections_accepted(),
                    "connections_refused": stats.connections_refused(),
                    "connections_refused_per_address": stats.connections_refused_per_address(),
                    "connections_evicted": stats.connections_evicted(),
                    "bytes_in": stats.bytes_in(), "bytes_out": stats.bytes_out(),
                })
            })
            .collect();
        Response::ok(serde_json::json!({
            "server_id": self.store.server_id(),
            "pid": std::process::id(),
            "version": crate::VERSION,
            "commit": crate::COMMIT,
            "uptime_s": self.started.elapsed().as_secs(),
            "listeners": listeners,
            "incubators": incubators,
            "viewers_logged_in": self.viewers.len(),
            "storage": storage,
            "writer": serde_json::to_value(self.writer.stats()).unwrap_or_default(),
            "writer_queue": self.writer.queue_len(),
            "database_reopens": self.store.reopens(),
            "disk_free_bytes": crate::os::disk_free_bytes(&self.data_dir).ok(),
            "disk_reserve_bytes": self.disk.reserve_bytes(),
            "writes_refused_disk_low": self.disk.is_low(),
            "resident_bytes": crate::os::resident_bytes(),
            "database_file": self.store.path(),
            "database_bytes": std::fs::metadata(self.store.path()).map(|m| m.len()).ok(),
            "volumes_dir": self.store.volumes_dir(),
            "backup": self.backups.status(now_ms),
            "archive": self.archive.as_ref().map(|archive| archive.status()),
            "activity": self.activity.as_ref().map(|activity| activity.status()),
        }))
    }
}

/// Runs the server until SIGTERM or SIGINT, then shuts down gracefully. SIGHUP reads the
/// configuration again (`reload`: the same file and command-line overrides as at the start)
/// and applies what can change while running ([`RunningServer::reload`]). Under systemd it
/// says when it is ready, reloading and stopping, and pings the watchdog while healthy
/// ([`crate::service`]).
pub fn serve(
    config: &Config,
    reload: &dyn Fn() -> Result<Config, String>,
) -> Result<(), StartError> {
    let mut signals =
        crate::os::ServiceSignals::install().map_err(|source| StartError::Control {
            path: config.storage.data_dir.clone(),
            source,
        })?;
    let mut manager = crate::service::ServiceManager::from_env();
    let server = start(config)?;
    tracing::info!(version = crate::VERSION_TEXT, server_id = %server.store().server_id(), data_dir = %config.storage.data_dir.display(),
        "esserver is running; SIGTERM or Ctrl-C stops it, SIGHUP reloads its configuration");
    manager.ready(&format!(
        "serving; data in {}",
        config.storage.data_dir.display()
    ));
    let mut running = config.clone();
    let signal = loop {
        match signals.wait(manager.tick()) {
            Some(crate::os::ServiceSignal::Stop(name)) => break name,
            Some(crate::os::ServiceSignal::Reload) => {
                manager.reloading();
                running = server.reload(&running, reload());
                manager.ready("serving; configuration reloaded");
            }
            None => {}
        }
        manager.watchdog(|| server.healthy());
    };
    tracing::info!(
        signal,
        "shutting down: no new connections; finishing in-flight commits"
    );
    manager.stopping();
    server.shutdown();
    tracing::info!("stopped cleanly");
    Ok(())
}

/// The sections (or keys) of `new` that differ from the configuration in force and apply only
/// at the next start.
fn restart_needed(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut differs = |name: &'static str, changed: bool| {
        if changed {
            out.push(name);
        }
    };
    differs("[IncubatorTransport]", running.incubator != new.incubator);
    differs("[ViewerTransport]", running.viewer != new.viewer);
    differs(
        "[WebInterface]",
        running.web != new.web || running.web_tls != new.web_tls,
    );
    differs("[PublicApi]", running.public_api != new.public_api);
    differs("[Storage]", running.storage != new.storage);
    differs("[Limits]", running.limits != new.limits);
    differs("[Security]", running.security != new.security);
    differs(
        "[Server] activity",
        running.server.activity != new.server.activity,
    );
    differs("[License] trusted_keys", running.license != new.license);
    differs("[IMS]", running.ims != new.ims);
    differs("[TLS]", running.tls != new.tls);
    differs("[Clinic]", running.clinic != new.clinic);
    differs("[Backup]", running.backup != new.backup);
    differs("[Archive]", running.archive != new.archive);
    out
}

/// What to do when a port below 1024 is refused: the service runs without capabilities.
fn bind_hint(address: &SocketAddr, error: &std::io::Error) -> &'static str {
    if address.port() != 0
        && address.port() < 1024
        && error.kind() == std::io::ErrorKind::PermissionDenied
    {
        "; a port below 1024 needs CAP_NET_BIND_SERVICE: as a service, add a drop-in \
         (systemctl edit esserver) with CapabilityBoundingSet=CAP_NET_BIND_SERVICE and \
         AmbientCapabilities=CAP_NET_BIND_SERVICE (docs/operations.md), or use a port above 1023"
    } else {
        ""
    }
}

#[cfg(test)]
mod bind_hint_tests {
    use super::*;

    #[test]
    fn a_refused_low_port_names_the_capability_and_nothing_else_does() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let low: SocketAddr = "0.0.0.0:443".parse().unwrap();
        let high: SocketAddr = "0.0.0.0:3000".parse().unwrap();
        let message = StartError::Bind {
            service: "public API",
            address: low,
            source: denied,
        }
        .to_string();
        assert!(message.contains("CAP_NET_BIND_SERVICE"), "{message}");
        assert_eq!(
            bind_hint(
                &high,
                &std::io::Error::from(std::io::ErrorKind::PermissionDenied)
            ),
            ""
        );
        assert_eq!(
            bind_hint(&low, &std::io::Error::from(std::io::ErrorKind::AddrInUse)),
            ""
        );
    }
}
