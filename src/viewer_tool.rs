//! `esserver viewer`: a command-line viewer client. It reads the viewers' `Viewer_d.ini`
//! (`[Servers]` lines `name=ip:port`, the manual's section 6), logs in, browses patients,
//! dishes and embryos, exports a time-lapse sequence to JPEG files and sets annotations. The
//! server's certificate is pinned on first use (in a pins file beside the ini, or `--pins`)
//! and a changed certificate is refused; `--ca FILE` verifies a CA-signed certificate instead.
//!
//! It speaks the protocol through the same client as the tests and the load generator
//! (`es_client::viewer`).

use es_client::viewer::{Credentials, ViewerClient, ViewerError};
use es_net::client::ClientTls;
use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Largest `Viewer_d.ini` read.
const INI_BYTES_MAX: u64 = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

/// One `[Servers]` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub name: String,
    pub address: SocketAddr,
}

/// Reads and parses a `Viewer_d.ini` of at most 64 KiB.
pub fn read_viewer_ini(path: &Path) -> Result<Vec<ServerEntry>, String> {
    use std::io::Read;
    let file = path.display().to_string();
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(INI_BYTES_MAX + 1).read_to_string(&mut text))
        .map_err(|error| format!("cannot read {file}: {error}"))?;
    if text.len() as u64 > INI_BYTES_MAX {
        return Err(format!("{file} is larger than {INI_BYTES_MAX} bytes"));
    }
    parse_viewer_ini(&text, &file)
}

/// Parses `Viewer_d.ini`: the `[Servers]` section's `name=ip:port` lines. Errors name the
/// file and line.
pub fn parse_viewer_ini(text: &str, file: &str) -> Result<Vec<ServerEntry>, String> {
    let mut in_servers = false;
    let mut servers = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim().trim_start_matches('\u{feff}');
        let number = index + 1;
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            in_servers = line.eq_ignore_ascii_case("[servers]");
            continue;
        }
        if !in_servers {
            continue;
        }
        let Some((name, address)) = line.split_once('=') else {
            return Err(format!(
                "{file}:{number}: expected `server name=ip_address:port`, found {line:?}"
            ));
        };
        let name = name.trim();
        let address: SocketAddr = address.trim().parse().map_err(|_| {
            format!(
                "{file}:{number}: {:?} is not ip_address:port (for example 192.168.1.10:3010)",
                address.trim()
            )
        })?;
        if name.is_empty() {
            return Err(format!("{file}:{number}: the server name is empty"));
        }
        if servers.iter().any(|s: &ServerEntry| s.name == name) {
            return Err(format!("{file}:{number}: server {name:?} is listed twice"));
        }
        servers.push(ServerEntry {
            name: name.to_string(),
            address,
        });
    }
    if servers.is_empty() {
        return Err(format!(
            "{file}: no server in a [Servers] section (lines `name=ip_address:port`)"
        ));
    }
    Ok(servers)
}

/// Picks the server named `wanted`, or the only one.
pub fn pick_server(servers: &[ServerEntry], wanted: Option<&str>) -> Result<ServerEntry, String> {
    let names = || {
        servers
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match wanted {
        Some(name) => servers
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| format!("no server named {name:?} in the ini; it lists: {}", names())),
        None if servers.len() == 1 => Ok(servers[0].clone()),
        None => Err(format!(
            "the ini lists several servers ({}); pick one with --server NAME",
            names()
        )),
    }
}

/// The pins file: lines `ip:port sha256-hex`.
pub struct Pins {
    path: PathBuf,
    lines: Vec<(String, String)>,
}

impl Pins {
    pub fn load(path: &Path) -> Result<Pins, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => {
                return Err(format!(
                    "cannot read the pins file {}: {error}",
                    path.display()
                ))
            }
        };
        let lines = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect();
        Ok(Pins {
            path: path.to_path_buf(),
            lines,
        })
    }

    pub fn get(&self, address: &SocketAddr) -> Option<String> {
        let key = address.to_string();
        self.lines
            .iter()
            .find(|(a, _)| *a == key)
            .map(|(_, f)| f.clone())
    }

    pub fn add(&mut self, address: &SocketAddr, fingerprint: &str) -> Result<(), String> {
        self.lines
            .push((address.to_string(), fingerprint.to_string()));
        let text: String = self
            .lines
            .iter()
            .map(|(a, f)| format!("{a} {f}\n"))
            .collect();
        std::fs::write(&self.path, text).map_err(|error| {
            format!(
                "cannot write the pins file {}: {error}",
                self.path.display()
            )
        })
    }
}

/// How to reach and trust the server.
pub struct Target {
    pub server: ServerEntry,
    pub ca: Option<PathBuf>,
    pub pins: PathBuf,
}

/// Connects and logs in, pinning the certificate on first use.
pub fn connect(target: &Target, credentials: &Credentials) -> Result<ViewerClient, String> {
    let address = target.server.address;
    if let Some(ca) = &target.ca {
        let config = es_net::tls::ca_client_config(ca).map_err(|error| error.to_string())?;
        let server_name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
        let tls = ClientTls::Tls {
            config,
            server_name,
        };
        return ViewerClient::login(address, &tls, credentials, TIMEOUT)
            .map_err(|e| login_error(&target.server, e));
    }
    let mut pins = Pins::load(&target.pins)?;
    let expected = pins.get(&address);
    let seen = Arc::new(parking_lot::Mutex::new(None));
    let tls = ClientTls::Tls {
        config: es_net::tls::first_use_client_config(expected.clone(), seen.clone()),
        server_name: "esserver".try_into().expect("a valid name"),
    };
    let result = ViewerClient::login(address, &tls, credentials, TIMEOUT);
    let presented = seen.lock().clone();
    match (&expected, &presented) {
        (Some(expected), Some(presented)) if expected != presented => {
            return Err(format!(
                "REFUSED: the certificate of {} ({address}) changed since it was pinned.\n  pinned:    {expected}\n  presented: {presented}\n\
                 This can mean someone is intercepting the connection. If the server's certificate was replaced on purpose, \
                 check the new fingerprint with the administrator (esserver logs it at start) and remove the line for {address} from {}.",
                target.server.name,
                target.pins.display()
            ));
        }
        (None, Some(presented)) => {
            pins.add(&address, presented)?;
            eprintln!(
                "pinned the certificate of {} ({address}): SHA-256 {presented} (in {})",
                target.server.name,
                target.pins.display()
            );
        }
        _ => {}
    }
    result.map_err(|error| login_error(&target.server, error))
}

fn login_error(server: &ServerEntry, error: ViewerError) -> String {
    format!("{} ({}): {error}", server.name, server.address)
}

fn call(client: &mut ViewerClient, request: Request) -> Result<Body, String> {
    client.call(request).map_err(|error| error.to_string())
}

pub use crate::times::time_text;

/// `patients`: every patient with its treatments.
pub fn list_patients(client: &mut ViewerClient) -> Result<(), String> {
    let mut after = String::new();
    let mut listed = 0usize;
    loop {
        let request = Request::ListPatients(pb::ListPatients {
            after_patient_id: after.clone(),
            limit: 1000,
        });
        let Body::PatientList(page) = call(client, request)? else {
            return Err("unexpected answer to ListPatients".into());
        };
        listed += page.patients.len();
        for patient in &page.patients {
            let treatments: Vec<_> = patient.treatments.iter().map(|t| t.name.as_str()).collect();
            println!(
                "{:<20} {} {} ({})  treatments: {}",
                patient.patient_id,
                patient.first_name,
                patient.last_name,
                if patient.date_of_birth.is_empty() {
                    "-"
                } else {
                    &patient.date_of_birth
                },
                treatments.join(", ")
            );
        }
        if page.next_after.is_empty() {
            if listed == 0 {
                println!("no patients yet (they are created when an incubator registers a dish)");
            }
            return Ok(());
        }
        after = page.next_after;
    }
}

/// `dishes PATIENT TREATMENT`: the dishes of a treatment with their embryos.
pub fn list_dishes(
    client: &mut ViewerClient,
    patient_id: &str,
    treatment: &str,
) -> Result<(), String> {
    let request = Request::ListDishes(pb::ListDishes {
        patient_id: patient_id.into(),
        treatment_name: treatment.into(),
    });
    let Body::DishList(list) = call(client, request)? else {
        return Err("unexpected answer to ListDishes".into());
    };
    for dish in list.dishes {
        let Body::Dish(dish) = call(
            client,
            Request::GetDish(pb::GetDish {
                dish_key: dish.dish_key,
            }),
        )?
        else {
            return Err("unexpected answer to GetDish".into());
        };
        println!(
            "dish {} (key {}) on {} slot {}, inseminated {}",
            dish.dish_id,
            dish.dish_key,
            dish.instrument_serial,
            dish.slot,
            time_text(dish.insemination_at_ms)
        );
        for embryo in dish.embryos {
            println!(
                "  well {:>3}  {:<32} fate {:<9} version {}  annotations {}",
                embryo.well,
                embryo.embryo_id,
                embryo.fate,
                embryo.version,
                embryo.annotations.len()
            );
        }
    }
    Ok(())
}

fn get_embryo(client: &mut ViewerClient, embryo_id: &str) -> Result<pb::Embryo, String> {
    match call(
        client,
        Request::GetEmbryo(pb::GetEmbryo {
            embryo_id: embryo_id.into(),
        }),
    )? {
        Body::Embryo(embryo) => Ok(embryo),
        _ => Err("unexpected answer to GetEmbryo".into()),
    }
}

/// `embryo ID`: details and annotations.
pub fn show_embryo(client: &mut ViewerClient, embryo_id: &str) -> Result<(), String> {
    let embryo = get_embryo(client, embryo_id)?;
    println!(
        "embryo {} (dish {} well {}), version {}",
        embryo.embryo_id, embryo.dish_id, embryo.well, embryo.version
    );
    println!(
        "  patient {} treatment {}",
        embryo.patient_id, embryo.treatment_name
    );
    println!("  fate {}  comment {:?}", embryo.fate, embryo.comment);
    for a in &embryo.annotations {
        let time = if a.has_event {
            format!("{:.2} h", a.hours)
        } else {
            "-".into()
        };
        println!(
            "  #{:<5} {:<6} {:<8} value {:<8} by {} ({}, {})",
            a.annotation_id,
            a.name,
            time,
            a.value,
            a.set_by,
            a.source,
            time_text(a.set_at_ms)
        );
    }
    let request = Request::ListAcquisitions(pb::ListAcquisitions {
        embryo_id: embryo_id.into(),
        ..Default::default()
    });
    if let Body::AcquisitionList(list) = call(client, request)? {
        if let (Some(first), Some(last)) = (list.acquisitions.first(), list.acquisitions.last()) {
            println!(
                "  {} acquisitions from {} to {}, focal planes {:?}",
                list.acquisitions.len(),
                time_text(first.acquired_at_ms),
                time_text(last.acquired_at_ms),
                last.focal_planes
            );
        }
    }
    Ok(())
}

/// `activity ID [--svg FILE]`: the curve's summary and proposals; the plot to `svg`.
pub fn activity(
    client: &mut ViewerClient,
    embryo_id: &str,
    svg: Option<&Path>,
) -> Result<(), String> {
    let embryo = get_embryo(client, embryo_id)?;
    let request = Request::GetActivity(pb::GetActivity {
        embryo_id: embryo_id.into(),
    });
    let Body::Activity(curve) = call(client, request)? else {
        return Err("unexpected answer to GetActivity".into());
    };
    let peak = curve
        .points
        .iter()
        .map(|p| p.activity)
        .fold(0.0f64, f64::max);
    println!(
        "activity of embryo {embryo_id} at focal plane {}: {} points, highest {peak:.4}, {} frame(s) skipped{}",
        curve.focal_plane,
        curve.points.len(),
        curve.frames_skipped,
        if curve.pending {
            " (later acquisitions are still being analysed)"
        } else {
            ""
        }
    );
    for proposed in &curve.proposed {
        println!(
            "  proposed {:<3} {:>7.2} h  (acquisition {})",
            proposed.event,
            proposed.hours,
            time_text(proposed.acquired_at_ms)
        );
    }
    if curve.proposed.is_empty() {
        println!("  no cleavage time proposed");
    }
    if let Some(path) = svg {
        let points: Vec<es_models::activity::Point> = curve
            .points
            .iter()
            .map(|p| es_models::activity::Point {
                acquired_at_ms: p.acquired_at_ms,
                activity: p.activity,
            })
            .collect();
        let mut proposed = es_models::activity::Proposed::default();
        for p in &curve.proposed {
            let slot = match p.event.as_str() {
                "t2" => &mut proposed.t2,
                "t3" => &mut proposed.t3,
                "t4" => &mut proposed.t4,
                "t5" => &mut proposed.t5,
                _ => continue,
            };
            *slot = Some(p.hours);
        }
        let title = format!("Blastomere activity of embryo {embryo_id}");
        let plot = es_models::activity::svg(&points, embryo.insemination_at_ms, &proposed, &title);
        std::fs::write(path, plot)
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
        println!("  plot written to {}", path.display());
    }
    Ok(())
}

/// `evaluate ID MODEL [--version N]`: applies the model and prints the embryo's result.
pub fn evaluate(
    client: &mut ViewerClient,
    embryo_id: &str,
    model: &str,
    version: u32,
) -> Result<(), String> {
    let embryo = get_embryo(client, embryo_id)?;
    let request = Request::Evaluate(pb::Evaluate {
        embryo_id: embryo_id.into(),
        expected_version: embryo.version,
        model: model.into(),
        version,
    });
    let Body::Saved(saved) = call(client, request)? else {
        return Err("unexpected answer to Evaluate".into());
    };
    let request = Request::ListEvaluations(pb::ListEvaluations {
        embryo_id: embryo_id.into(),
    });
    let Body::EvaluationList(list) = call(client, request)? else {
        return Err("unexpected answer to ListEvaluations".into());
    };
    let result = list
        .evaluations
        .iter()
        .find(|e| e.model.eq_ignore_ascii_case(model))
        .ok_or_else(|| format!("embryo {embryo_id} has no result of model {model}"))?;
    println!(
        "{model} version {} on embryo {embryo_id}: {} {} ({}); embryo now at version {}",
        result.version, result.outcome, result.value, result.rule, saved.version
    );
    for variable in &result.variables {
        println!("  {:<8} {}", variable.name, variable.value);
    }
    Ok(())
}

/// `export ID`: the time-lapse at one focal plane as numbered JPEG files. Returns the count.
pub fn export(
    client: &mut ViewerClient,
    embryo_id: &str,
    focal_plane: i32,
    out: &Path,
    max_frames: u32,
) -> Result<u32, String> {
    std::fs::create_dir_all(out)
        .map_err(|error| format!("cannot create {}: {error}", out.display()))?;
    let seq = client.send(Request::Playback(pb::Playback {
        embryo_id: embryo_id.into(),
        focal_plane,
        from_ms: 0,
        to_ms: 0,
        max_frames,
    }));
    let mut written = 0u32;
    loop {
        let body = client
            .wait(seq, "a frame")
            .map_err(|error| error.to_string())?;
        let Body::Frame(frame) = body else {
            return Err("unexpected answer to Playback".into());
        };
        if let Some(image) = frame.image {
            let name = format!(
                "{embryo_id}_F{focal_plane}_{:05}_{}.jpg",
                frame.index, image.acquired_at_ms
            );
            let path = out.join(name.replace(['/', '\\'], "_"));
            std::fs::write(&path, &image.jpeg)
                .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
            written += 1;
            if written % 100 == 0 {
                eprintln!("  {written} frames written");
            }
        }
        if frame.last {
            return Ok(written);
        }
    }
}

/// `annotate ID NAME`: adds an annotation on the embryo's current version.
pub fn annotate(
    client: &mut ViewerClient,
    embryo_id: &str,
    name: &str,
    value: &str,
    hours: Option<f64>,
) -> Result<pb::Saved, String> {
    let embryo = get_embryo(client, embryo_id)?;
    let event_at_ms = hours.map(|h| {
        embryo
            .insemination_at_ms
            .saturating_add((h * 3_600_000.0).round() as i64)
    });
    let request = Request::AddAnnotation(pb::AddAnnotation {
        embryo_id: embryo_id.into(),
        expected_version: embryo.version,
        annotation: Some(pb::AnnotationInput {
            name: name.into(),
            value: value.into(),
            event_at_ms: event_at_ms.unwrap_or(0),
            has_event: event_at_ms.is_some(),
            source: "manual".into(),
        }),
    });
    match call(client, request)? {
        Body::Saved(saved) => Ok(saved),
        _ => Err("unexpected answer to AddAnnotation".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewer_ini_servers_section() {
        let text = "; viewer\n[General]\nx=1\n[Servers]\nClinic A = 192.168.1.10:3010\n# note\nBackup=10.0.0.2:3010\n";
        let servers = parse_viewer_ini(text, "Viewer_d.ini").unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].name, "Clinic A");
        assert_eq!(servers[0].address, "192.168.1.10:3010".parse().unwrap());
        assert_eq!(
            pick_server(&servers, Some("Backup")).unwrap().name,
            "Backup"
        );
        assert!(pick_server(&servers, None)
            .unwrap_err()
            .contains("--server"));
        let error = parse_viewer_ini("[Servers]\nA=nowhere\n", "V.ini").unwrap_err();
        assert!(error.starts_with("V.ini:2:"), "{error}");
        assert!(parse_viewer_ini("[Other]\nA=1.2.3.4:1\n", "V.ini").is_err());
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(time_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time_text(1_718_100_000_000), "2024-06-11 10:00:00 UTC");
    }
}
