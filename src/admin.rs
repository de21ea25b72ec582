//! Admin commands: each runs against a live server through the control socket when one
//! runs on the data directory, and opens the database directly otherwise.

use crate::config::Config;
use crate::control::{self, Request, Response};
use es_storage::{Store, StoreOptions, WriteOutcome, Writer};
use std::path::Path;

/// Verifies every stored image and the store's invariants (the same report, online or
/// offline).
pub fn verify_report(store: &Store) -> Response {
    let mut last_reported = 0u64;
    let result = store.verify(&mut |progress| {
        if progress.images_checked >= last_reported + 100_000 {
            last_reported = progress.images_checked;
            tracing::info!(
                checked = progress.images_checked,
                total = progress.images_total,
                "verifying images"
            );
        }
    });
    match result {
        Ok(report) => Response::ok(serde_json::json!({
            "clean": report.is_clean(),
            "images_checked": report.images_checked,
            "damaged_images": report.damaged_images,
            "problems": report.problems,
        })),
        Err(error) => Response::error(error.code(), error.to_string()),
    }
}

pub fn reset_secret(writer: &Writer, serial: &str) -> Response {
    let (sender, receiver) = crossbeam_channel::bounded(1);
    let op = crate::server::reset_secret_op(serial);
    let done: es_storage::Completion = Box::new(move |result| {
        let _ = sender.send(result);
    });
    if writer.submit(op, done).is_err() {
        return Response::error("shutting_down", "the server is shutting down");
    }
    match receiver.recv() {
        Ok(Ok(WriteOutcome::SecretReset { existed: true })) => Response::ok(serde_json::json!({
            "serial": serial, "message": format!("the secret of {serial} was reset; its next HELLO is issued a new one"),
        })),
        Ok(Ok(_)) => Response::error(
            "unknown_instrument",
            format!("no instrument with serial number {serial} is known"),
        ),
        Ok(Err(error)) => Response::error(error.code(), error.to_string()),
        Err(_) => Response::error("internal_error", "the storage writer stopped"),
    }
}

/// Runs `request` on the live server, or on the database directly when none runs.
pub fn run(config: &Config, request: Request) -> Result<Response, String> {
    let data_dir = &config.storage.data_dir;
    match control::call(data_dir, &request) {
        Ok(Some(response)) => return Ok(response),
        Ok(None) => {}
        Err(error) => {
            return Err(format!(
                "cannot reach the server's control socket in {}: {error}",
                data_dir.display()
            ))
        }
    }
    offline(config, data_dir, request)
}

fn offline(config: &Config, data_dir: &Path, request: Request) -> Result<Response, String> {
    if !data_dir.join(es_storage::DATABASE_FILE_NAME).exists() {
        return Err(format!(
            "no esserver database in {} (start the server once, or name the directory with --data)",
            data_dir.display()
        ));
    }
    let options = StoreOptions {
        cache_bytes: config.storage.cache_bytes,
        ..StoreOptions::default()
    };
    let store = Store::open(data_dir, &options, [0; 16]).map_err(|error| {
        format!(
            "cannot open the database in {}: {error}",
            data_dir.display()
        )
    })?;
    Ok(match request {
        Request::Status => {
            let stats = store.read().and_then(|reader| reader.stats());
            match stats {
                Ok(stats) => Response::ok(serde_json::json!({
                    "server_running": false,
                    "server_id": store.server_id(),
                    "storage": stats,
                    "disk_free_bytes": crate::os::disk_free_bytes(data_dir).ok(),
                    "database_file": store.path(),
                })),
                Err(error) => Response::error(error.code(), error.to_string()),
            }
        }
        Request::Verify => verify_report(&store),
        Request::ResetSecret { serial } => {
            let writer = store.start_writer(es_storage::WriterOptions::default());
            let response = reset_secret(&writer, &serial);
            writer.shutdown();
            response
        }
    })
}
