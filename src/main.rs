//! The `esserver` command line: `serve` runs the server; the other subcommands are admin
//! tools that reach a running server through its control socket.

use clap::{Parser, Subcommand};
use esserver::config::Config;
use esserver::control::{Request, Response};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "esserver",
    version = esserver::VERSION_TEXT,
    about = "Central data server of an IVF clinic's time-lapse embryo culture system"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Configuration file (default: ./EmbryoServer.ini when present, else built-in defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (overrides [Storage] data_dir).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace (overrides [Server] log_level).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server until SIGTERM or Ctrl-C.
    Serve(Common),
    /// Show connected incubators, their rates, listeners and storage figures.
    Status {
        #[command(flatten)]
        common: Common,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every stored image against its SHA-256 and the store's invariants.
    Verify(Common),
    /// Back the store up while the server runs (or while it is stopped); check or list
    /// backups (`backup verify`, `backup list`).
    Backup(BackupArgs),
    /// Restore a backup into a new data directory.
    Restore(RestoreArgs),
    /// Archive now: move the sealed volumes older than [Archive] after_days to the object
    /// store (the server also does it by itself every check_interval_ms).
    Archive {
        #[command(flatten)]
        common: Common,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Check instead: every archived volume's object is in the store with its recorded
        /// size (`--check full`: read back whole, SHA-256 compared too).
        #[arg(long, value_name = "size|full", num_args = 0..=1, default_missing_value = "size")]
        check: Option<String>,
    },
    /// Print the server id and where things are.
    Info(Common),
    /// Manage instruments.
    Instrument {
        #[command(subcommand)]
        action: InstrumentAction,
    },
    /// Manage viewer and API users (the first administrator: `user add NAME --admin`).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Licences: make a signing key, issue, verify and show licence files (the issuing side
    /// keeps its private key away from the server).
    License {
        #[command(subcommand)]
        action: LicenseAction,
    },
    /// Plan capacity: which licence configuration a set of devices and computers needs, the
    /// load they bring, storage growth and days until the disk is full, and the headroom a
    /// load-test report measured.
    Capacity(CapacityArgs),
    /// Instrument monitoring (IMS): the telemetry queue and its uploader.
    Ims {
        #[command(subcommand)]
        action: ImsAction,
    },
    /// The server's generated TLS certificate.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
    },
    /// Manage public API keys (for EMR and data-warehouse systems).
    Apikey {
        #[command(subcommand)]
        action: ApiKeyAction,
    },
    /// The clinic's selection models (docs/models.md): import, export, list, show, evaluate.
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
    /// A command-line viewer: log in to a server of Viewer_d.ini, browse, export, annotate.
    Viewer(ViewerArgs),
    /// Print a complete, commented EmbryoServer.ini with the defaults.
    DefaultConfig {
        /// The data directory the file names (default: ./es-data), e.g. /var/lib/esserver for
        /// an installed service.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BackupArgs {
    #[command(subcommand)]
    action: Option<BackupAction>,
    /// The backup target: a directory (created when missing) holding this server's backups,
    /// or s3://bucket/prefix (reached with [Archive]'s endpoint and credentials, or AWS_*).
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    to: Option<String>,
    /// Print the report as JSON on standard output (progress stays on standard error).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand)]
enum BackupAction {
    /// Check every file of a backup against its manifest (size and SHA-256).
    Verify {
        /// The backup target.
        #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
        from: String,
        /// Which backup (default: the newest).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
        /// The configuration file whose [Archive] reaches an s3:// target.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// List the complete backups of a target, oldest first.
    List {
        /// The backup target.
        #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
        from: String,
        #[arg(long)]
        json: bool,
        /// The configuration file whose [Archive] reaches an s3:// target.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The backup target.
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    from: String,
    /// The configuration file whose [Archive] reaches an s3:// target.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Which backup (default: the newest).
    #[arg(long)]
    name: Option<String>,
    /// The new data directory: must not exist, or be empty.
    #[arg(long, value_name = "NEWDIR")]
    data: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ViewerArgs {
    /// The viewers' configuration file ([Servers] lines `name=ip:port`).
    #[arg(long, value_name = "FILE", default_value = "Viewer_d.ini")]
    ini: PathBuf,
    /// Which server of the ini (needed when it lists several).
    #[arg(long, value_name = "NAME")]
    server: Option<String>,
    /// User name.
    #[arg(long, short)]
    user: String,
    /// Read the password from the first line of standard input instead of asking.
    #[arg(long)]
    password_stdin: bool,
    /// This computer's name (default: the host name).
    #[arg(long)]
    computer: Option<String>,
    /// Verify the server's certificate against this CA file instead of pinning it.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Where pinned certificates are kept (default: Viewer_d.pins beside the ini).
    #[arg(long, value_name = "FILE")]
    pins: Option<PathBuf>,
    #[command(subcommand)]
    action: ViewerAction,
}

#[derive(Subcommand)]
enum ViewerAction {
    /// List patients and their treatments.
    Patients,
    /// List the dishes and embryos of a treatment.
    Dishes {
        patient_id: String,
        treatment: String,
    },
    /// Show an embryo: fate, annotations, acquisitions.
    Embryo { embryo_id: String },
    /// Export an embryo's time-lapse at one focal plane as JPEG files.
    Export {
        embryo_id: String,
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        plane: i32,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// At most this many frames (0: all, up to 10,000).
        #[arg(long, default_value_t = 0)]
        max: u32,
    },
    /// Add an annotation (a timing event with --hours after insemination, or a --value).
    Annotate {
        embryo_id: String,
        name: String,
        #[arg(long, default_value = "")]
        value: String,
        #[arg(long)]
        hours: Option<f64>,
    },
    /// Show an embryo's blastomere-activity curve and the cleavage times it proposes;
    /// --svg draws it to a file.
    Activity {
        embryo_id: String,
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Apply a model (its newest version, or --version) to an embryo and show the result.
    Evaluate {
        embryo_id: String,
        model: String,
        #[arg(long, default_value_t = 0)]
        version: u32,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Create a user; the password is asked for (or read from standard input).
    Add {
        name: String,
        /// view, edit or admin.
        #[arg(long, default_value = "view", value_name = "RIGHTS")]
        rights: String,
        /// Same as --rights admin.
        #[arg(long)]
        admin: bool,
        /// Read the password from the first line of standard input (for scripts).
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Set a new password (also clears a lock-out).
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Refuse the user's logins until enabled again.
    Disable {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    Enable {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Clear a lock-out after too many failed logins.
    Unlock {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// List users, their rights and state.
    List {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ApiKeyAction {
    /// Create a key; it is printed once and cannot be shown again.
    Create {
        /// What the key is for (the EMR's name, for example); shown in lists and the audit.
        #[arg(long)]
        name: String,
        /// read (everything the API offers) or write (also outcomes, scores, fate,
        /// demographics).
        #[arg(long, default_value = "read", value_name = "SCOPE")]
        scope: String,
        #[command(flatten)]
        common: Common,
    },
    /// Revoke a key at once (by its id, the 16 hex characters after `esk_`).
    Revoke {
        key_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// List keys (never their secrets).
    List {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ModelAction {
    /// Import a model document (JSON, docs/models.md): a new name is version 1, a changed
    /// document the next version.
    Import {
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Write a model's document (its newest version, or --version) to a file or stdout.
    Export {
        name: String,
        #[arg(long)]
        version: Option<u32>,
        /// Where to write it (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// List every model and version.
    List {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        json: bool,
    },
    /// Show a model (its newest version, or --version) with its document.
    Show {
        name: String,
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        common: Common,
    },
    /// Apply a model to embryos (--embryo, repeatable) or to every embryo of a treatment
    /// (--patient and --treatment); the results are stored and shown.
    Evaluate {
        name: String,
        #[arg(long)]
        version: Option<u32>,
        #[arg(long, value_name = "EMBRYO_ID")]
        embryo: Vec<String>,
        #[arg(long, value_name = "PATIENT_ID", requires = "treatment")]
        patient: Option<String>,
        #[arg(long, value_name = "NAME", requires = "patient")]
        treatment: Option<String>,
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct CapacityArgs {
    /// The devices: model:count, comma-separated (es-plus, es-flex, es-8, es-d, culturepro).
    #[arg(long, value_name = "MIX")]
    devices: String,
    /// Viewer computers.
    #[arg(long, default_value_t = 1)]
    computers: u32,
    /// Free space on the data disk (e.g. 4TB, 800 GiB), for days until full.
    #[arg(long, value_name = "SIZE")]
    disk_free: Option<String>,
    /// A `loadtest ingest-bench --json` report: the headroom is its measured ingestion
    /// throughput over the peak load required.
    #[arg(long, value_name = "FILE")]
    measured: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TlsAction {
    /// Make the self-signed certificate anew, naming `[TLS] names` (or the host name,
    /// loopback and every address the listeners bind); the server uses it from its next start.
    /// Prints the new SHA-256 fingerprint for viewers that pin it.
    Renew(Common),
}

#[derive(Subcommand)]
enum LicenseAction {
    /// Make a new signing key (private, owner-only file) and print its public key.
    Keygen {
        /// Where to write the private key; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Sign a licence for one server.
    Issue {
        /// The private key made by `license keygen`.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The server id the licence is for (`esserver info` prints it).
        #[arg(long)]
        server_id: String,
        #[arg(long)]
        clinic: String,
        /// basic (1 viewer computer, 2 units) or high-capacity (4 computers, 16 units).
        #[arg(long, value_name = "CONFIGURATION")]
        configuration: String,
        /// A viewer computer allowed to connect, by name (repeat for each).
        #[arg(long = "computer", value_name = "NAME")]
        computers: Vec<String>,
        #[arg(long, default_value_t = 0)]
        mobile_devices: u32,
        /// Last day of validity, yyyy-mm-dd (UTC, inclusive); none: does not expire.
        #[arg(long, value_name = "DATE")]
        expires: Option<String>,
        /// The licence's identifier (default: made from the time of issue).
        #[arg(long)]
        id: Option<String>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Check a licence file against trusted public keys and a server id.
    Verify {
        file: PathBuf,
        /// A trusted public key, 64 hex characters (repeat for each).
        #[arg(long = "trust", value_name = "HEX", required = true)]
        trusted: Vec<String>,
        #[arg(long)]
        server_id: String,
    },
    /// Print what a licence file says, without checking its signature.
    Show { file: PathBuf },
    /// Install a licence on this server (a running one uses it at once).
    Install {
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum InstrumentAction {
    /// Change the name an instrument is shown by; its serial number, dishes and images stay.
    Rename {
        serial: String,
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Set an instrument's number: the `I<number>` of its embryo ids, reported to EMR
    /// systems as `InstrumentNumber`. Instruments that send their own number in HELLO need
    /// this only to correct it; once set here, HELLO no longer changes it.
    Number {
        serial: String,
        /// 1 or more.
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        number: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Enrol a new instrument's serial number (with `[IncubatorTransport] enrolment =
    /// approve`, an unknown serial waits as pending until approved); its next connection is
    /// issued a secret. Works with the server running or stopped.
    Approve {
        /// The instrument's serial number (the web interface lists those waiting).
        serial: String,
        #[command(flatten)]
        common: Common,
    },
    /// Forget an instrument's secret: its next HELLO is issued a new one.
    ResetSecret {
        /// The instrument's serial number.
        serial: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum ImsAction {
    /// Queue depth, oldest record, last success and error, bytes sent per incubator.
    Status {
        #[command(flatten)]
        common: Common,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause receiving, uploading or both on the running server (until its next start).
    Pause {
        /// receive, upload or all.
        #[arg(default_value = "all", value_parser = ["receive", "upload", "all"])]
        part: String,
        #[command(flatten)]
        common: Common,
    },
    /// Resume receiving, uploading or both on the running server.
    Resume {
        /// receive, upload or all.
        #[arg(default_value = "all", value_parser = ["receive", "upload", "all"])]
        part: String,
        #[command(flatten)]
        common: Common,
    },
}

fn ims(action: ImsAction) -> Result<ExitCode, String> {
    use esserver::control::ImsRequest;
    let switch = |part: &str, on: bool| -> Result<ImsRequest, String> {
        let part = esserver::ims::Part::parse(part)
            .ok_or_else(|| format!("`{part}`: expected receive, upload or all"))?;
        Ok(ImsRequest::Set {
            part,
            on,
            by: operator(),
        })
    };
    let (common, request, json, done) = match action {
        ImsAction::Status { common, json } => (common, ImsRequest::Status, json, None),
        ImsAction::Pause { part, common } => {
            let done = format!("{part}: paused until the server's next start");
            (common, switch(&part, false)?, false, Some(done))
        }
        ImsAction::Resume { part, common } => {
            let done = format!("{part}: resumed");
            (common, switch(&part, true)?, false, Some(done))
        }
    };
    admin(&common, Request::Ims { action: request }, |body| {
        if let Some(done) = done {
            println!("{done}");
        }
        if json {
            println!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
        } else {
            print_ims_status(body);
        }
    })
}

/// The installed service's configuration (the Debian package's conffile).
const INSTALLED_CONFIG: &str = "/etc/esserver/EmbryoServer.ini";

/// The configuration `serve` runs with: `--config`, else `./EmbryoServer.ini` when present,
/// else the built-in defaults; `--data` and `--log-level` override.
fn load_config(common: &Common) -> Result<Config, String> {
    load_config_from(common, false)
}

/// The configuration an admin command uses: as `serve`'s, but on an installed system (no
/// `--config`, no `--data`, no `./EmbryoServer.ini`) the service's, so that the command finds
/// the running service's data directory without being told. Run as root there, the command
/// then runs as the service account (`esserver`), so that whatever it creates in the data
/// directory (the database before the first start, a renewed certificate) stays the
/// service's to read.
fn admin_config(common: &Common) -> Result<Config, String> {
    let installed = common.config.is_none()
        && common.data.is_none()
        && !PathBuf::from("EmbryoServer.ini").exists()
        && PathBuf::from(INSTALLED_CONFIG).exists();
    if installed {
        if let Err(error) = std::fs::File::open(INSTALLED_CONFIG) {
            return Err(format!(
                "cannot read {INSTALLED_CONFIG} ({error}): run the command as root (sudo \
                 esserver ...), or name the configuration or data directory with --config or \
                 --data"
            ));
        }
        esserver::os::become_service_account(SERVICE_ACCOUNT).map_err(|error| {
            format!("cannot run as the service account {SERVICE_ACCOUNT}: {error}")
        })?;
    }
    load_config_from(common, installed)
}

/// The installed service's account.
const SERVICE_ACCOUNT: &str = "esserver";

fn load_config_from(common: &Common, installed: bool) -> Result<Config, String> {
    let default_file = PathBuf::from("EmbryoServer.ini");
    let path = common
        .config
        .clone()
        .or_else(|| default_file.exists().then_some(default_file))
        .or_else(|| installed.then(|| PathBuf::from(INSTALLED_CONFIG)));
    let mut config = match &path {
        Some(path) => Config::load(path).map_err(|error| error.to_string())?,
        None => Config::default(),
    };
    if let Some(data) = &common.data {
        config.storage.data_dir = data.clone();
    }
    if let Some(level) = &common.log_level {
        config.server.log_level = level.clone();
    }
    Ok(config)
}

fn init_logging(level: &str) -> Result<(), String> {
    esserver::logging::init(level)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("esserver: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Serve(common) => {
            let config = load_config(&common)?;
            init_logging(&config.server.log_level)?;
            // SIGHUP reads the same file with the same command-line overrides.
            let reload = || load_config(&common);
            esserver::server::serve(&config, &reload).map_err(|error| error.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { common, json } => admin(&common, Request::Status, |body| {
            if json {
                println!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
            } else {
                print_status(body);
            }
        }),
        Command::Verify(common) => {
            let config = admin_config(&common)?;
            init_logging(&config.server.log_level)?;
            let response = esserver::admin::run(&config, Request::Verify)?;
            let clean = response.body.get("clean").and_then(|v| v.as_bool()) == Some(true);
            report(&response, |body| {
                println!("{}", serde_json::to_string_pretty(body).unwrap_or_default())
            });
            Ok(if response.ok && clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Backup(args) => backup(args),
        Command::Archive {
            common,
            json,
            check,
        } => archive(&common, json, check.as_deref()),
        Command::Restore(args) => restore(args),
        Command::Tls {
            action: TlsAction::Renew(common),
        } => {
            let config = admin_config(&common)?;
            let names = esserver::server::certificate_names(&config);
            let (cert, _key) = es_net::tls::renew_self_signed(&config.storage.data_dir, &names)
                .map_err(|error| error.to_string())?;
            let der = es_net::tls::read_certificate(&cert).map_err(|error| error.to_string())?;
            println!("certificate {} made anew", cert.display());
            println!("names:   {}", names.join(", "));
            println!("sha256:  {}", es_net::tls::fingerprint(&der));
            println!("a running server uses it from its next start; viewers that pin the certificate need the new one");
            Ok(ExitCode::SUCCESS)
        }
        Command::Info(common) => {
            let config = admin_config(&common)?;
            let dir = &config.storage.data_dir;
            match esserver::server::read_info(dir) {
                Some(info)
                    if esserver::control::call(dir, &Request::Status)
                        .ok()
                        .flatten()
                        .is_some() =>
                {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&info).unwrap_or_default()
                    );
                }
                _ => admin(&common, Request::Status, |body| {
                    println!("server id: {}", body["server_id"].as_str().unwrap_or("?"));
                    println!(
                        "database:  {}",
                        body["database_file"].as_str().unwrap_or("?")
                    );
                    println!("server running: no");
                })
                .map(|_| ())?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Instrument {
            action:
                InstrumentAction::Rename {
                    serial,
                    name,
                    common,
                },
        } => admin(
            &common,
            Request::InstrumentRename {
                serial,
                display_name: name,
                by: operator(),
            },
            |body| println!("{}", body["message"].as_str().unwrap_or("done")),
        ),
        Command::Instrument {
            action:
                InstrumentAction::Number {
                    serial,
                    number,
                    common,
                },
        } => admin(
            &common,
            Request::InstrumentNumber {
                serial,
                number,
                by: operator(),
            },
            |body| println!("{}", body["message"].as_str().unwrap_or("done")),
        ),
        Command::Instrument {
            action: InstrumentAction::Approve { serial, common },
        } => admin(
            &common,
            Request::InstrumentApprove {
                serial,
                by: operator(),
            },
            |body| println!("{}", body["message"].as_str().unwrap_or("done")),
        ),
        Command::Instrument {
            action: InstrumentAction::ResetSecret { serial, common },
        } => admin(&common, Request::ResetSecret { serial }, |body| {
            println!("{}", body["message"].as_str().unwrap_or("done"));
        }),
        Command::User { action } => user(action),
        Command::Apikey { action } => api_key(action),
        Command::Model { action } => model(action),
        Command::Ims { action } => ims(action),
        Command::License { action } => license(action),
        Command::Capacity(args) => capacity(args),
        Command::Viewer(args) => viewer(args),
        Command::DefaultConfig { data_dir } => {
            let mut config = Config::default();
            if let Some(dir) = data_dir {
                config.storage.data_dir = dir;
            }
            print!("{}", config.to_ini());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Who runs an admin command, for the audit trail.
fn operator() -> String {
    let name = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("os:{name}")
}

/// Reads a new password (twice from the terminal, or once from standard input) and checks
/// the policy; returns its argon2id hash.
fn new_password_hash(from_stdin: bool) -> Result<String, String> {
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|error| format!("cannot read the password from standard input: {error}"))?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        let first = rpassword::prompt_password("New password: ").map_err(|error| {
            format!("cannot read the password: {error} (use --password-stdin in scripts)")
        })?;
        let second = rpassword::prompt_password("Repeat it: ")
            .map_err(|error| format!("cannot read the password: {error}"))?;
        if first != second {
            return Err("the two passwords differ; nothing was changed".into());
        }
        first
    };
    esserver::accounts::check_password_policy(&password)?;
    esserver::accounts::hash_password(&password)
}

fn user(action: UserAction) -> Result<ExitCode, String> {
    use esserver::control::UserRequest;
    let by = operator();
    let (common, request, json) = match action {
        UserAction::Add {
            name,
            rights,
            admin,
            password_stdin,
            common,
        } => {
            es_storage_name(&name)?;
            let rights = if admin { "admin".to_string() } else { rights };
            let password_hash = new_password_hash(password_stdin)?;
            let request = UserRequest::Add {
                name,
                password_hash,
                rights,
                by,
            };
            (common, request, false)
        }
        UserAction::Passwd {
            name,
            password_stdin,
            common,
        } => {
            let password_hash = new_password_hash(password_stdin)?;
            (
                common,
                UserRequest::Passwd {
                    name,
                    password_hash,
                    by,
                },
                false,
            )
        }
        UserAction::Disable { name, common } => (common, UserRequest::Disable { name, by }, false),
        UserAction::Enable { name, common } => (common, UserRequest::Enable { name, by }, false),
        UserAction::Unlock { name, common } => (common, UserRequest::Unlock { name, by }, false),
        UserAction::List { common, json } => (common, UserRequest::List, json),
    };
    admin(&common, Request::User { action: request }, |body| {
        if let Some(message) = body["message"].as_str() {
            println!("{message}");
            return;
        }
        if json {
            println!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
            return;
        }
        println!(
            "{:<24} {:<6} {:<9} {:<8} last login",
            "user", "rights", "state", "failures"
        );
        for user in body["users"].as_array().into_iter().flatten() {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let locked_from: Vec<&str> = user["locks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|lock| lock[1].as_i64().unwrap_or(0) > now_ms)
                .filter_map(|lock| lock[0].as_str())
                .collect();
            let state = if user["disabled"].as_bool() == Some(true) {
                "disabled".to_string()
            } else if user["locked_until_ms"].as_i64().unwrap_or(0) > now_ms {
                "locked".to_string()
            } else if !locked_from.is_empty() {
                format!("locked from {}", locked_from.join(","))
            } else {
                "active".to_string()
            };
            let last = match user["last_login_ms"].as_i64() {
                Some(ms) if ms > 0 => esserver::viewer_tool::time_text(ms),
                _ => "never".to_string(),
            };
            println!(
                "{:<24} {:<6} {:<9} {:<8} {last}",
                user["name"].as_str().unwrap_or("?"),
                user["rights"].as_str().unwrap_or("?"),
                state,
                user["failed_logins"]
            );
        }
    })
}

/// The capacity planner: configuration, load, storage growth, headroom. Exit 1 when no
/// configuration fits.
fn capacity(args: CapacityArgs) -> Result<ExitCode, String> {
    use es_perf::{capacity, config_rules};
    let devices =
        config_rules::parse_devices(&args.devices).map_err(|e| format!("--devices: {e}"))?;
    if devices.is_empty() {
        return Err("--devices names no device (for example es-plus:3,es-d:10)".into());
    }
    let fits = config_rules::smallest_fitting(&devices, args.computers);
    let load = capacity::estimate(&devices);
    let disk_free =
        match &args.disk_free {
            None => None,
            Some(text) => Some(disk_size(text.trim()).ok_or_else(|| {
                format!("--disk-free {text:?} is not a size such as 4TB or 800 GiB")
            })?),
        };
    let days_until_full = disk_free.map(|free| free as f64 / load.bytes_per_day.max(1) as f64);
    let measured = match &args.measured {
        None => None,
        Some(path) => Some(measured_images_per_s(path)?),
    };
    let headroom = measured.map(|m| m / load.images_per_s_peak());
    let report = serde_json::json!({
        "devices": devices.iter().map(|(m, n)| serde_json::json!({"model": m.name(), "count": n})).collect::<Vec<_>>(),
        "computers": args.computers,
        "configuration": fits.as_ref().ok().map(|c| c.name()),
        "refused": fits.as_ref().err().map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>()),
        "usage": fits.as_ref().ok().map(|c| config_rules::usage(*c, &devices, args.computers)),
        "load": load,
        "images_per_s_peak": load.images_per_s_peak(),
        "disk_free_bytes": disk_free,
        "days_until_full": days_until_full,
        "measured_images_per_s": measured,
        "headroom": headroom,
    });
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        match &fits {
            Ok(configuration) => {
                let used = config_rules::usage(*configuration, &devices, args.computers);
                println!(
                    "configuration: {} ({} of {} capacity units, {} of {} EmbryoScope+/Flex, {} of {} computers)",
                    configuration.name(), used.units_used, used.units_max, used.plus_flex_used,
                    used.plus_flex_max, used.computers_used, used.computers_max
                );
            }
            Err(violations) => {
                println!("no configuration fits:");
                for violation in violations {
                    println!("  {violation}");
                }
            }
        }
        println!(
            "load: {:.1} images/s mean, {:.1} at peaks ({:.0} x), {:.2} MB/s",
            load.images_per_s,
            load.images_per_s_peak(),
            es_perf::capacity::BURST_FACTOR,
            load.bytes_per_s / 1e6
        );
        println!(
            "storage growth: {} images and {:.1} GB a day",
            load.images_per_day,
            load.bytes_per_day as f64 / 1e9
        );
        if let (Some(free), Some(days)) = (disk_free, days_until_full) {
            println!(
                "disk: {:.0} GB free, full in {days:.0} days at this rate",
                free as f64 / 1e9
            );
        }
        if let (Some(measured), Some(headroom)) = (measured, headroom) {
            println!(
                "headroom: measured {measured:.0} images/s / required {:.1} at peaks = {headroom:.0} x",
                load.images_per_s_peak()
            );
        }
    }
    Ok(if fits.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A disk size: the configuration's sizes, and TB / TiB as disks are sold.
fn disk_size(text: &str) -> Option<u64> {
    let lower = text.to_ascii_lowercase();
    for (suffix, unit) in [("tib", 1u64 << 40), ("tb", 1_000_000_000_000)] {
        if let Some(number) = lower.strip_suffix(suffix) {
            let number = number.trim();
            if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            return number.parse::<u64>().ok()?.checked_mul(unit);
        }
    }
    esserver::config::parse_size(text)
}

/// The highest sustained ingestion (images/s) in a `loadtest ingest-bench --json` report.
fn measured_images_per_s(path: &std::path::Path) -> Result<f64, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let report: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not a JSON report: {e}", path.display()))?;
    let runs = match &report {
        serde_json::Value::Array(runs) => runs.clone(),
        other => vec![other.clone()],
    };
    runs.iter()
        .filter_map(|run| run["throughput"]["images_per_s"].as_f64())
        .reduce(f64::max)
        .ok_or_else(|| {
            format!(
                "{} has no throughput.images_per_s: give the JSON of `loadtest ingest-bench --json FILE`",
                path.display()
            )
        })
}

fn license(action: LicenseAction) -> Result<ExitCode, String> {
    use esserver::license::{self as lic, Configuration, License, SigningKey, TrustedKey};
    match action {
        LicenseAction::Keygen { out } => {
            let key = SigningKey::generate()?;
            write_new_private_file(&out, &key.to_hex())?;
            println!(
                "private key written to {} (keep it away from the server)",
                out.display()
            );
            println!("public key (the servers' trusted licence key):");
            println!("{}", key.public_hex());
            Ok(ExitCode::SUCCESS)
        }
        LicenseAction::Issue {
            key,
            server_id,
            clinic,
            configuration,
            computers,
            mobile_devices,
            expires,
            id,
            out,
        } => {
            let text = std::fs::read_to_string(&key)
                .map_err(|e| format!("cannot read {}: {e}", key.display()))?;
            let key = SigningKey::from_hex(&text).map_err(|e| format!("{}: {e}", key.display()))?;
            let configuration: Configuration = configuration
                .parse()
                .map_err(|e| format!("--configuration: {e}"))?;
            let expires_at_ms = match expires {
                None => None,
                Some(day) => {
                    let start = esserver::times::parse_iso_utc(&format!("{day}T00:00:00Z"))
                        .ok_or_else(|| format!("--expires {day:?} is not a yyyy-mm-dd date"))?;
                    Some(start + 86_400_000)
                }
            };
            let now = esserver::now_ms();
            if let Some(expires_at_ms) = expires_at_ms {
                if expires_at_ms <= now {
                    return Err(format!(
                        "--expires {}: that day is past, so the licence would never be valid; \
                         name its last valid day",
                        expires_at_ms
                            .checked_sub(86_400_000)
                            .map_or_else(String::new, |ms| esserver::times::iso_utc(ms)[..10]
                                .to_string())
                    ));
                }
            }
            let license = License {
                license_id: id.unwrap_or_else(|| format!("L-{now}")),
                clinic,
                server_id,
                configuration,
                viewer_computers: computers,
                mobile_devices,
                issued_at_ms: now,
                expires_at_ms,
                demo: false,
            };
            lic::check_content(&license)?;
            if out.exists() {
                return Err(format!("{} exists; name a new file", out.display()));
            }
            std::fs::write(&out, key.issue(&license))
                .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
            println!(
                "licence {} for {} ({}, {}) written to {}",
                license.license_id,
                license.clinic,
                configuration.name(),
                license
                    .expires_at_ms
                    .map_or("never expires".to_string(), esserver::times::valid_through),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        LicenseAction::Verify {
            file,
            trusted,
            server_id,
        } => {
            let trusted = trusted
                .iter()
                .map(|k| TrustedKey::from_hex(k))
                .collect::<Result<Vec<_>, _>>()?;
            let text =
                std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            match lic::verify(&text, &trusted, &server_id, esserver::now_ms(), false) {
                Ok(license) => {
                    println!("valid: {}", license_summary(&license));
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    println!("invalid ({}): {error}", error.code());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        LicenseAction::Install { file, common } => {
            let text =
                std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            if text.len() > lic::FILE_BYTES_MAX {
                return Err(format!(
                    "{} is not a licence file (too large)",
                    file.display()
                ));
            }
            let text = String::from_utf8(text)
                .map_err(|_| format!("{} is not a licence file (not text)", file.display()))?;
            admin(&common, Request::LicenseInstall { text }, |body| {
                println!("{}", body["message"].as_str().unwrap_or("installed"));
            })
        }
        LicenseAction::Show { file } => {
            let text =
                std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let outer: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| format!("{} is not a licence file: {e}", file.display()))?;
            let payload = outer["payload"].as_str().unwrap_or("");
            let license: License = serde_json::from_str(payload).map_err(|e| {
                format!("{}: the licence content is malformed: {e}", file.display())
            })?;
            println!(
                "{} (signature NOT checked; use `license verify`)",
                license_summary(&license)
            );
            println!("signed by key {}", outer["key_id"].as_str().unwrap_or("?"));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn license_summary(license: &esserver::license::License) -> String {
    let expires = license
        .expires_at_ms
        .map_or("never expires".to_string(), esserver::times::valid_through);
    format!(
        "licence {} for {}, server {}, {}, viewer computers [{}], {} mobile devices, {}{}",
        license.license_id,
        license.clinic,
        license.server_id,
        license.configuration.name(),
        license.viewer_computers.join(", "),
        license.mobile_devices,
        expires,
        if license.demo { " (DEMO)" } else { "" }
    )
}

/// Creates `path` readable by its owner only and writes `text`; an existing file is an error.
fn write_new_private_file(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    writeln!(file, "{text}").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.sync_all()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn model(action: ModelAction) -> Result<ExitCode, String> {
    use esserver::control::ModelRequest;
    match action {
        ModelAction::Import { file, common } => {
            let bytes = std::fs::metadata(&file)
                .map_err(|error| format!("cannot read {}: {error}", file.display()))?
                .len();
            let most = es_models::model::limits::DOCUMENT_BYTES_MAX as u64;
            if bytes > most {
                return Err(format!(
                    "{} is {bytes} bytes; a model document is at most {most}",
                    file.display()
                ));
            }
            let document = std::fs::read_to_string(&file)
                .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
            // Checked here first, so a mistake is named with its place before anything is sent.
            es_models::Model::from_json(document.as_bytes())
                .map_err(|error| format!("{}: {error}", file.display()))?;
            let request = ModelRequest::Import {
                document,
                by: operator(),
            };
            admin(&common, Request::Model { action: request }, |body| {
                println!("{}", body["message"].as_str().unwrap_or("imported"));
            })
        }
        ModelAction::Export {
            name,
            version,
            out,
            common,
        } => {
            let request = ModelRequest::Show { name, version };
            let mut written = Ok(());
            let status = admin(&common, Request::Model { action: request }, |body| {
                let document = body["document"].as_str().unwrap_or_default();
                written = match &out {
                    Some(path) => std::fs::write(path, document)
                        .map_err(|error| format!("cannot write {}: {error}", path.display())),
                    None => {
                        println!("{document}");
                        Ok(())
                    }
                };
            })?;
            written.map(|()| status)
        }
        ModelAction::List { common, json } => admin(
            &common,
            Request::Model {
                action: ModelRequest::List,
            },
            |body| {
                if json {
                    println!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
                    return;
                }
                println!(
                    "{:<40} {:>7} {:<15} {:<5} imported",
                    "name", "version", "kind", "used"
                );
                for model in body["models"].as_array().into_iter().flatten() {
                    println!(
                        "{:<40} {:>7} {:<15} {:<5} {} by {}",
                        model["name"].as_str().unwrap_or("?"),
                        model["version"],
                        model["kind"].as_str().unwrap_or("?"),
                        if model["used"] == true { "yes" } else { "no" },
                        esserver::times::time_text(model["imported_at_ms"].as_i64().unwrap_or(0)),
                        model["imported_by"].as_str().unwrap_or("?"),
                    );
                }
            },
        ),
        ModelAction::Show {
            name,
            version,
            common,
        } => admin(
            &common,
            Request::Model {
                action: ModelRequest::Show { name, version },
            },
            |body| {
                println!(
                    "model {} version {} ({}), {}, imported {} by {}",
                    body["name"].as_str().unwrap_or("?"),
                    body["version"],
                    body["kind"].as_str().unwrap_or("?"),
                    if body["used"] == true {
                        "used (it never changes again)"
                    } else {
                        "not used yet"
                    },
                    esserver::times::time_text(body["imported_at_ms"].as_i64().unwrap_or(0)),
                    body["imported_by"].as_str().unwrap_or("?"),
                );
                println!("{}", body["document"].as_str().unwrap_or_default());
            },
        ),
        ModelAction::Evaluate {
            name,
            version,
            embryo,
            patient,
            treatment,
            common,
            json,
        } => {
            if embryo.is_empty() && patient.is_none() {
                return Err(
                    "name the embryos: --embryo ID (repeatable), or --patient and --treatment"
                        .into(),
                );
            }
            let request = ModelRequest::Evaluate {
                model: name,
                version,
                embryos: embryo,
                treatment: patient.zip(treatment),
                by: operator(),
            };
            admin(&common, Request::Model { action: request }, |body| {
                if json {
                    println!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
                    return;
                }
                for result in body["results"].as_array().into_iter().flatten() {
                    println!(
                        "{}: {} (v{}; {})",
                        result["embryo_id"].as_str().unwrap_or("?"),
                        match result["outcome"].as_str() {
                            Some("not_available") => format!(
                                "not available: {}",
                                result["value"].as_str().unwrap_or("?")
                            ),
                            _ => result["value"].as_str().unwrap_or("?").to_string(),
                        },
                        result["version"],
                        result["rule"].as_str().unwrap_or("")
                    );
                }
            })
        }
    }
}

fn api_key(action: ApiKeyAction) -> Result<ExitCode, String> {
    use esserver::control::ApiKeyRequest;
    let by = operator();
    match action {
        ApiKeyAction::Create {
            name,
            scope,
            common,
        } => {
            if es_storage::ApiScope::from_name(&scope).is_none() {
                return Err(format!("--scope is read or write, not {scope:?}"));
            }
            let (key_id, key, digest) = esserver::api::auth::new_api_key()?;
            let request = ApiKeyRequest::Create {
                key_id,
                name,
                scope,
                secret_sha256: hex::encode(digest),
                by,
            };
            admin(&common, Request::ApiKey { action: request }, |body| {
                println!("{}", body["message"].as_str().unwrap_or("created"));
                println!("key (shown once; store it in the client's configuration):");
                println!("{key}");
            })
        }
        ApiKeyAction::Revoke { key_id, common } => {
            let request = ApiKeyRequest::Revoke { key_id, by };
            admin(&common, Request::ApiKey { action: request }, |body| {
                println!("{}", body["message"].as_str().unwrap_or("revoked"));
            })
        }
        ApiKeyAction::List { common, json } => admin(
            &common,
            Request::ApiKey {
                action: ApiKeyRequest::List,
            },
            |body| {
                if json {
                    println!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
                    return;
                }
                println!(
                    "{:<16} {:<6} {:<8} {:<24} name",
                    "key id", "scope", "state", "created"
                );
                for key in body["keys"].as_array().into_iter().flatten() {
                    let revoked = key["revoked_at_ms"].as_i64().unwrap_or(0) != 0;
                    println!(
                        "{:<16} {:<6} {:<8} {:<24} {}",
                        key["key_id"].as_str().unwrap_or("?"),
                        key["scope"].as_str().unwrap_or("?"),
                        if revoked { "revoked" } else { "active" },
                        esserver::times::time_text(key["created_at_ms"].as_i64().unwrap_or(0)),
                        key["name"].as_str().unwrap_or("?"),
                    );
                }
            },
        ),
    }
}

fn viewer(args: ViewerArgs) -> Result<ExitCode, String> {
    use esserver::viewer_tool as tool;
    let servers = tool::read_viewer_ini(&args.ini)?;
    let server = match (&args.server, servers.len()) {
        // Several servers, none named, someone at the terminal: ask which.
        (None, count) if count > 1 && !args.password_stdin && std::io::stdin().is_terminal() => {
            choose_server(&servers)?
        }
        _ => tool::pick_server(&servers, args.server.as_deref())?,
    };
    let password = if args.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|error| format!("cannot read the password: {error}"))?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        rpassword::prompt_password(format!("Password for {} on {}: ", args.user, server.name))
            .map_err(|error| {
                format!("cannot read the password: {error} (use --password-stdin in scripts)")
            })?
    };
    let computer = args.computer.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|name| name.trim().to_string())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "viewer".to_string())
    });
    let pins = args.pins.unwrap_or_else(|| args.ini.with_extension("pins"));
    let target = tool::Target {
        server,
        ca: args.ca,
        pins,
    };
    let credentials = es_client::viewer::Credentials {
        user: args.user,
        password,
        computer,
    };
    let mut client = tool::connect(&target, &credentials)?;
    eprintln!(
        "logged in to {} as {} ({})",
        target.server.name, client.login.user, client.login.rights
    );
    match args.action {
        ViewerAction::Patients => tool::list_patients(&mut client)?,
        ViewerAction::Dishes {
            patient_id,
            treatment,
        } => tool::list_dishes(&mut client, &patient_id, &treatment)?,
        ViewerAction::Embryo { embryo_id } => tool::show_embryo(&mut client, &embryo_id)?,
        ViewerAction::Export {
            embryo_id,
            plane,
            out,
            max,
        } => {
            let count = tool::export(&mut client, &embryo_id, plane, &out, max)?;
            println!(
                "{count} frames of {embryo_id} at focal plane {plane} written to {}",
                out.display()
            );
        }
        ViewerAction::Annotate {
            embryo_id,
            name,
            value,
            hours,
        } => {
            let saved = tool::annotate(&mut client, &embryo_id, &name, &value, hours)?;
            println!(
                "saved: annotation {} of embryo {} (annotation id {}), embryo now at version {}",
                name, saved.id, saved.annotation_id, saved.version
            );
        }
        ViewerAction::Activity { embryo_id, svg } => {
            tool::activity(&mut client, &embryo_id, svg.as_deref())?
        }
        ViewerAction::Evaluate {
            embryo_id,
            model,
            version,
        } => tool::evaluate(&mut client, &embryo_id, &model, version)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Lists the servers of the ini and reads the number of one from the terminal.
fn choose_server(
    servers: &[esserver::viewer_tool::ServerEntry],
) -> Result<esserver::viewer_tool::ServerEntry, String> {
    for (index, server) in servers.iter().enumerate() {
        eprintln!("  {}. {} ({})", index + 1, server.name, server.address);
    }
    eprint!("Server [1-{}]: ", servers.len());
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|error| format!("cannot read the choice: {error}"))?;
    let choice: usize = line.trim().parse().map_err(|_| {
        format!(
            "{:?} is not a number from 1 to {}",
            line.trim(),
            servers.len()
        )
    })?;
    servers
        .get(choice.wrapping_sub(1))
        .cloned()
        .ok_or_else(|| format!("{choice} is not a number from 1 to {}", servers.len()))
}

fn es_storage_name(name: &str) -> Result<(), String> {
    es_storage::user_name(name).map_err(|error| error.to_string())
}

fn admin(
    common: &Common,
    request: Request,
    print: impl FnOnce(&serde_json::Value),
) -> Result<ExitCode, String> {
    let config = admin_config(common)?;
    let response = esserver::admin::run(&config, request)?;
    report(&response, print);
    Ok(if response.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn backup(args: BackupArgs) -> Result<ExitCode, String> {
    use esserver::backup::{bytes_text, error_text, ProgressPrinter};
    match args.action {
        Some(BackupAction::Verify {
            from,
            name,
            json,
            config,
        }) => {
            let (from, archive) = backup_target(&from, config)?;
            let source = from.source(&archive)?;
            let mut printer = ProgressPrinter::new("backup verify");
            let report =
                es_storage::backup::verify_from(source.as_ref(), name.as_deref(), &mut |p| {
                    printer.show(p)
                })
                .map_err(|error| error_text(&error))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else if report.is_clean() {
                println!(
                    "backup {} in {}: {} files, {}, every one matches its manifest",
                    report.name,
                    from,
                    report.files,
                    bytes_text(report.bytes)
                );
            } else {
                println!("backup {} in {from} is DAMAGED:", report.name);
                for line in &report.damaged {
                    println!("  {line}");
                }
            }
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Some(BackupAction::List { from, json, config }) => {
            let (from, archive) = backup_target(&from, config)?;
            let source = from.source(&archive)?;
            let manifests = es_storage::backup::list_from(source.as_ref())
                .map_err(|error| error_text(&error))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&manifests).unwrap_or_default()
                );
            } else if manifests.is_empty() {
                println!("no complete backup in {from}");
            } else {
                for manifest in &manifests {
                    println!(
                        "{}  {} images, {}, change {} , schema {}",
                        manifest.name,
                        manifest.images,
                        bytes_text(manifest.bytes()),
                        manifest.change_seq,
                        manifest.schema_version
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let Some(to) = args.to else {
                return Err(
                    "name the backup target with --to DIR (or: backup verify, backup list)".into(),
                );
            };
            let (to, _) = backup_target(&to, None)?;
            let config = admin_config(&args.common)?;
            let mut printer = ProgressPrinter::new("backup");
            let response = esserver::admin::run_with_progress(
                &config,
                Request::Backup { to: to.to_string() },
                &mut |value| printer.show_json(&value),
            )?;
            report(&response, |body| {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
                } else {
                    println!(
                        "backup {} complete in {}: {} files, {} ({} copied, the rest was there), \
                         {} images up to change {}, {:.1} s",
                        body["name"].as_str().unwrap_or("?"),
                        to,
                        body["files"],
                        bytes_text(body["bytes"].as_u64().unwrap_or(0)),
                        bytes_text(body["bytes_copied"].as_u64().unwrap_or(0)),
                        body["images"],
                        body["change_seq"],
                        body["seconds"].as_f64().unwrap_or(0.0)
                    );
                }
            });
            let missing = response.body["missing_volumes"]
                .as_array()
                .filter(|ids| !ids.is_empty());
            if let Some(ids) = missing {
                eprintln!(
                    "esserver: WARNING: the backup lacks volume(s) {ids:?}: their files are missing \
                     from the data directory, so their images are not in it (run `esserver verify`)"
                );
            }
            Ok(if response.ok && missing.is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn archive(common: &Common, json: bool, check: Option<&str>) -> Result<ExitCode, String> {
    use esserver::backup::bytes_text;
    let config = admin_config(common)?;
    let request = match check {
        None => Request::Archive,
        Some("size") => Request::ArchiveCheck { full: false },
        Some("full") => Request::ArchiveCheck { full: true },
        Some(other) => return Err(format!("--check takes size or full, not {other:?}")),
    };
    let checking = check.is_some();
    let response = esserver::admin::run_with_progress(&config, request, &mut |value| {
        eprintln!(
            "archive: volume {} ({}), {} of {}",
            value["volume"],
            bytes_text(value["bytes"].as_u64().unwrap_or(0)),
            value["number"],
            value["of"]
        );
    })?;
    report(&response, |body| {
        if json {
            println!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
        } else if checking {
            println!(
                "archive: {} archived volume(s) ({}) are in the object store{}",
                body["volumes_checked"],
                bytes_text(body["bytes"].as_u64().unwrap_or(0)),
                if body["full"] == true {
                    ", every byte as recorded"
                } else {
                    " with their recorded sizes"
                }
            );
        } else {
            println!(
                "archive: {} volume(s) archived ({}), {} local file(s) of archived volumes removed, \
                 {} due left",
                body["volumes_archived"],
                bytes_text(body["bytes_archived"].as_u64().unwrap_or(0)),
                body["local_files_removed"],
                body["volumes_due_left"]
            );
        }
    });
    Ok(if response.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A backup target named on the command line (a relative directory is taken from the
/// current one), with the [Archive] settings that reach an s3:// target: from `config`, or
/// ./EmbryoServer.ini when there is one.
fn backup_target(
    text: &str,
    config: Option<PathBuf>,
) -> Result<(esserver::backup::Target, esserver::config::ArchiveSection), String> {
    let text = if text.contains("://") {
        text.to_owned()
    } else {
        std::path::absolute(text)
            .map_err(|error| format!("cannot resolve {text}: {error}"))?
            .to_string_lossy()
            .into_owned()
    };
    let target = esserver::backup::Target::parse(&text)?;
    let config = admin_config(&Common {
        config,
        data: None,
        log_level: None,
    })?;
    Ok((target, config.archive))
}

fn restore(args: RestoreArgs) -> Result<ExitCode, String> {
    use esserver::backup::{bytes_text, error_text, ProgressPrinter};
    let (from, archive) = backup_target(&args.from, args.config.clone())?;
    let source = from.source(&archive)?;
    let mut printer = ProgressPrinter::new("restore");
    let report = es_storage::backup::restore_from(
        source.as_ref(),
        args.name.as_deref(),
        &args.data,
        &mut |p| printer.show(p),
    )
    .map_err(|error| error_text(&error))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!(
            "backup {} restored into {}: {} files, {}, {} images up to change {}; check it with \
             `esserver verify --data {}`",
            report.name,
            report.data_dir.display(),
            report.files,
            bytes_text(report.bytes),
            report.images,
            report.change_seq,
            report.data_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn report(response: &Response, print: impl FnOnce(&serde_json::Value)) {
    if response.ok {
        print(&response.body);
    } else {
        eprintln!(
            "esserver: {} ({})",
            response.message.as_deref().unwrap_or("failed"),
            response.code.as_deref().unwrap_or("error")
        );
    }
}

fn print_ims_status(body: &serde_json::Value) {
    let on = |key: &str| match body[key].as_bool() {
        Some(true) => "on",
        Some(false) => "off (paused or configured off)",
        None => "?",
    };
    let running = body.get("server_running").and_then(|v| v.as_bool()) != Some(false);
    if !running {
        println!(
            "server:        not running (queue read from the database; switches as configured)"
        );
    }
    println!("receive:       {}", on("receive"));
    println!("upload:        {}", on("upload"));
    println!(
        "endpoint:      {}",
        body["endpoint"]
            .as_str()
            .unwrap_or("none configured: nothing is uploaded ([IMS] endpoint)")
    );
    let queue = &body["queue"];
    let mib = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / 1048576.0;
    println!(
        "queue:         {} records, {:.2} MiB of {:.0} MiB",
        queue["records"],
        mib(&queue["bytes"]),
        mib(&body["queue_bytes_max"])
    );
    match body["oldest_age_s"].as_f64() {
        Some(age) if queue["records"].as_u64().unwrap_or(0) > 0 => {
            println!("oldest queued: {age:.0} s ago");
        }
        _ => {}
    }
    println!(
        "dropped:       {} records ({:.2} MiB) because the queue was full",
        queue["dropped_records"],
        mib(&queue["dropped_bytes"])
    );
    println!("withheld:      {} (kept here, not queued: a channel or alarm code not in the device catalog for its model)", queue["withheld"]);
    println!(
        "uploaded:      {} records in all",
        queue["uploaded_records"]
    );
    if !running {
        return;
    }
    let when = |key: &str| match body[key].as_i64() {
        Some(ms) if ms > 0 => {
            let ago = (esserver::now_ms() - ms).max(0) as f64 / 1000.0;
            format!("{ago:.0} s ago")
        }
        _ => "never".to_owned(),
    };
    println!("last success:  {}", when("last_success_ms"));
    match body["last_error"].as_str() {
        Some(error) => println!(
            "last error:    {} ({}); retry in {} ms",
            error,
            when("last_error_ms"),
            body["backoff_ms"]
        ),
        None => println!("last error:    none"),
    }
    println!(
        "since start:   {} batches, {} records, {} bytes sent; {} failed attempts",
        body["batches_sent"], body["records_sent"], body["bytes_sent"], body["failures"]
    );
    if let Some(rows) = body["per_instrument"].as_array().filter(|r| !r.is_empty()) {
        println!("sent per incubator, last hour (budget 0.5 Mbit/s each):");
        println!(
            "  {:<20} {:>14} {:>12} {:>10}",
            "serial", "bytes", "bit/s", "of budget"
        );
        for row in rows {
            println!(
                "  {:<20} {:>14} {:>12.1} {:>9.4}%",
                row["serial"].as_str().unwrap_or("?"),
                row["bytes_last_hour"],
                row["bits_per_s"].as_f64().unwrap_or(0.0),
                row["budget_used"].as_f64().unwrap_or(0.0) * 100.0
            );
        }
    }
}

fn print_status(body: &serde_json::Value) {
    let running = body.get("server_running").and_then(|v| v.as_bool()) != Some(false);
    println!("server id:  {}", body["server_id"].as_str().unwrap_or("?"));
    if !running {
        println!("server:     not running (figures read from the database)");
    } else {
        println!(
            "server:     running, pid {}, up {} s, esserver {} (commit {})",
            body["pid"],
            body["uptime_s"],
            body["version"].as_str().unwrap_or("?"),
            body["commit"].as_str().unwrap_or("?")
        );
        if let Some(rss) = body["resident_bytes"].as_u64() {
            println!("memory:     {:.1} MiB resident", rss as f64 / 1048576.0);
        }
        println!("listeners:");
        for l in body["listeners"].as_array().into_iter().flatten() {
            println!(
                "  {:<11} {:<22} tls={:<5} open={} accepted={} refused={} (per address {}) evicted={} in={} B out={} B",
                l["service"].as_str().unwrap_or("?"),
                l["address"].as_str().unwrap_or("?"),
                l["tls"],
                l["connections_open"],
                l["connections_accepted"],
                l["connections_refused"],
                l["connections_refused_per_address"],
                l["connections_evicted"],
                l["bytes_in"],
                l["bytes_out"]
            );
        }
        if let Some(viewers) = body["viewers_logged_in"].as_u64() {
            println!("viewers logged in: {viewers}");
        }
        let incubators = body["incubators"].as_array().cloned().unwrap_or_default();
        println!("incubators connected: {}", incubators.len());
        for i in &incubators {
            println!(
                "  {:<16} {:<10} {:<22} images={} ({:.2}/s, {:.1} KB/s) duplicates={} errors={}",
                i["serial"].as_str().unwrap_or("?"),
                i["model"].as_str().unwrap_or("?"),
                i["peer"].as_str().unwrap_or("?"),
                i["images"],
                i["images_per_s"].as_f64().unwrap_or(0.0),
                i["bytes_per_s"].as_f64().unwrap_or(0.0) / 1000.0,
                i["duplicates"],
                i["errors"]
            );
        }
    }
    let storage = &body["storage"];
    println!(
        "storage:    {} images ({:.1} MB) in {} acquisitions; {} dishes, {} embryos, {} patients, {} treatments, {} instruments",
        storage["images"],
        storage["image_bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
        storage["acquisitions"],
        storage["dishes"],
        storage["embryos"],
        storage["patients"],
        storage["treatments"],
        storage["instruments"]
    );
    println!(
        "            {} telemetry samples; change log up to {} ({} kept)",
        storage["telemetry_samples"], storage["last_change_seq"], storage["changes"]
    );
    let volume_bytes = storage["volume_bytes"].as_u64().unwrap_or(0);
    let database_bytes = body["database_bytes"].as_u64().unwrap_or(0);
    let image_bytes = storage["image_bytes"].as_u64().unwrap_or(0);
    let images = storage["images"].as_u64().unwrap_or(0);
    println!(
        "volumes:    {} ({} sealed), active {}; {:.1} MB of records in {}",
        storage["volumes"],
        storage["volumes_sealed"],
        storage["active_volume"],
        volume_bytes as f64 / 1e6,
        body["volumes_dir"].as_str().unwrap_or("?")
    );
    if images > 0 {
        println!(
            "            database {:.1} MB ({:.0} bytes per image); {:.3} bytes stored per image byte",
            database_bytes as f64 / 1e6,
            database_bytes as f64 / images as f64,
            (volume_bytes + database_bytes) as f64 / image_bytes.max(1) as f64
        );
    }
    let writer = &body["writer"];
    if let (Some(commits), Some(requests)) =
        (writer["commits"].as_u64(), writer["requests"].as_u64())
    {
        println!(
            "writer:     {} commits, {:.1} requests per commit, queue {}; apply {:.1} s, volume write+fdatasync {:.1} s, commit {:.1} s in total",
            commits,
            requests as f64 / commits.max(1) as f64,
            body["writer_queue"],
            writer["apply_us"].as_u64().unwrap_or(0) as f64 / 1e6,
            writer["volume_sync_us"].as_u64().unwrap_or(0) as f64 / 1e6,
            writer["commit_us"].as_u64().unwrap_or(0) as f64 / 1e6
        );
    }
    if let Some(free) = body["disk_free_bytes"].as_u64() {
        println!("disk free:  {:.1} GiB", free as f64 / 1073741824.0);
    }
    let backup = &body["backup"];
    if backup.is_object() {
        match backup["last_success"]["name"].as_str() {
            Some(name) => println!(
                "backup:     last {name} ({} h ago), {} in {}",
                backup["last_success_age_s"].as_u64().unwrap_or(0) / 3600,
                esserver::backup::bytes_text(backup["last_success"]["bytes"].as_u64().unwrap_or(0)),
                backup["last_success"]["target"].as_str().unwrap_or("?")
            ),
            None => println!("backup:     none taken"),
        }
        if let Some(warning) = backup["warning"].as_str() {
            println!("            WARNING: {warning}");
        }
    }
    let archive = &body["archive"];
    if archive.is_object() {
        println!(
            "archive:    {} volume(s), {} in {}; {} due",
            archive["volumes_archived"],
            esserver::backup::bytes_text(archive["bytes_archived"].as_u64().unwrap_or(0)),
            archive["target"].as_str().unwrap_or("?"),
            archive["volumes_due"]
        );
        if let Some(error) = archive["last_error"].as_str() {
            println!("            WARNING: the last archive pass failed: {error}");
        }
    }
    let activity = &body["activity"];
    if activity.is_object() {
        println!(
            "activity:   {} curve(s), {} change(s) still to look at; {} image(s) analysed in {:.1} s of CPU ({:.0} per CPU second, {})",
            activity["curves"],
            activity["changes_behind"],
            activity["images_analysed"],
            activity["cpu_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
            activity["images_per_cpu_s"].as_f64().unwrap_or(0.0),
            activity["priority"].as_str().unwrap_or("?")
        );
        if let Some(error) = activity["last_error"].as_str() {
            println!("            last problem: {error}");
        }
    } else if body["pid"].is_number() {
        // A running server without the computation (an offline status says nothing of it).
        println!("activity:   off ([Server] activity): curves are computed when asked for");
    }
}
