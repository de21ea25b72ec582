//! The `esserver` command line: `serve` runs the server; the other subcommands are admin
//! tools that reach a running server through its control socket.

use clap::{Parser, Subcommand};
use esserver::config::Config;
use esserver::control::{Request, Response};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "esserver",
    version,
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
    /// Print the server id and where things are.
    Info(Common),
    /// Manage instruments.
    Instrument {
        #[command(subcommand)]
        action: InstrumentAction,
    },
    /// Print a complete, commented EmbryoServer.ini with the defaults.
    DefaultConfig,
}

#[derive(Subcommand)]
enum InstrumentAction {
    /// Forget an instrument's secret: its next HELLO is issued a new one.
    ResetSecret {
        /// The instrument's serial number.
        serial: String,
        #[command(flatten)]
        common: Common,
    },
}

fn load_config(common: &Common) -> Result<Config, String> {
    let default_file = PathBuf::from("EmbryoServer.ini");
    let path = common
        .config
        .clone()
        .or_else(|| default_file.exists().then_some(default_file));
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
    let level: tracing::Level = level.parse().map_err(|_| {
        format!("unknown log level {level:?}; use error, warn, info, debug or trace")
    })?;
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    Ok(())
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
            esserver::server::serve(&config).map_err(|error| error.to_string())?;
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
            let config = load_config(&common)?;
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
        Command::Info(common) => {
            let config = load_config(&common)?;
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
            action: InstrumentAction::ResetSecret { serial, common },
        } => admin(&common, Request::ResetSecret { serial }, |body| {
            println!("{}", body["message"].as_str().unwrap_or("done"));
        }),
        Command::DefaultConfig => {
            print!("{}", Config::default().to_ini());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn admin(
    common: &Common,
    request: Request,
    print: impl FnOnce(&serde_json::Value),
) -> Result<ExitCode, String> {
    let config = load_config(common)?;
    let response = esserver::admin::run(&config, request)?;
    report(&response, print);
    Ok(if response.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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

fn print_status(body: &serde_json::Value) {
    let running = body.get("server_running").and_then(|v| v.as_bool()) != Some(false);
    println!("server id:  {}", body["server_id"].as_str().unwrap_or("?"));
    if !running {
        println!("server:     not running (figures read from the database)");
    } else {
        println!(
            "server:     running, pid {}, up {} s",
            body["pid"], body["uptime_s"]
        );
        if let Some(rss) = body["resident_bytes"].as_u64() {
            println!("memory:     {:.1} MiB resident", rss as f64 / 1048576.0);
        }
        println!("listeners:");
        for l in body["listeners"].as_array().into_iter().flatten() {
            println!(
                "  {:<11} {:<22} tls={:<5} open={} accepted={} in={} B out={} B",
                l["service"].as_str().unwrap_or("?"),
                l["address"].as_str().unwrap_or("?"),
                l["tls"],
                l["connections_open"],
                l["connections_accepted"],
                l["bytes_in"],
                l["bytes_out"]
            );
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
    let writer = &body["writer"];
    if let (Some(commits), Some(requests)) =
        (writer["commits"].as_u64(), writer["requests"].as_u64())
    {
        println!(
            "writer:     {} commits, {:.1} requests per commit, queue {}; apply {:.1} s, commit {:.1} s in total",
            commits,
            requests as f64 / commits.max(1) as f64,
            body["writer_queue"],
            writer["apply_us"].as_u64().unwrap_or(0) as f64 / 1e6,
            writer["commit_us"].as_u64().unwrap_or(0) as f64 / 1e6
        );
    }
    if let Some(free) = body["disk_free_bytes"].as_u64() {
        println!("disk free:  {:.1} GiB", free as f64 / 1073741824.0);
    }
}
