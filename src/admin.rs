//! Admin commands: each runs against a live server through the control socket when one
//! runs on the data directory, and opens the database directly otherwise.

use crate::config::Config;
use crate::control::{self, ApiKeyRequest, Request, Response, UserRequest};
use es_storage::{
    Actor, ApiKeyCreate, ApiKeyRevoke, ApiScope, InstrumentApprove, InstrumentRename,
    InstrumentRenumber, Operation, ResetInstrumentSecret, Rights, Store, StoreOptions, UserAdd,
    UserChange, UserUpdate, Writer,
};
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
            "orphan_records": report.orphan_records,
            "unreadable_ranges": report.unreadable_ranges,
            "volumes_checked": report.volumes_checked,
            "records_superseded": report.records_superseded,
            "volumes_archived": report.volumes_archived,
            "images_archived": report.images_archived,
        })),
        Err(error) => Response::error(error.code(), error.to_string()),
    }
}

pub fn reset_secret(writer: &Writer, serial: &str) -> Response {
    let op = ResetInstrumentSecret {
        serial: serial.to_string(),
    };
    match write_and_wait(writer, op) {
        Ok(reset) if reset.existed => Response::ok(serde_json::json!({
            "serial": serial, "message": format!("the secret of {serial} was reset; its next HELLO is issued a new one"),
        })),
        Ok(_) => Response::error(
            "unknown_instrument",
            format!("no instrument with serial number {serial} is known"),
        ),
        Err(response) => response,
    }
}

/// Renames an instrument (display name only; its serial, dishes and images stay).
pub fn instrument_rename(writer: &Writer, serial: &str, display_name: &str, by: &str) -> Response {
    let op = InstrumentRename {
        actor: Actor {
            user: by.to_string(),
            computer: "esserver instrument".to_string(),
        },
        serial: serial.to_string(),
        display_name: display_name.to_string(),
        at_ms: now_ms(),
    };
    match write_and_wait(writer, op) {
        Ok(_) => Response::ok(serde_json::json!({
            "message": format!("instrument {serial} is now shown as {display_name:?}; its data is unchanged"),
        })),
        Err(response) => response,
    }
}

/// Sets an instrument's number, as the original reports it (`InstrumentNumber`) and as its
/// embryo ids carry it; from then on its HELLO no longer changes it.
pub fn instrument_number(writer: &Writer, serial: &str, number: u32, by: &str) -> Response {
    let op = InstrumentRenumber {
        actor: Actor {
            user: by.to_string(),
            computer: "esserver instrument".to_string(),
        },
        serial: serial.to_string(),
        number,
        at_ms: now_ms(),
    };
    match write_and_wait(writer, op) {
        Ok(_) => Response::ok(serde_json::json!({
            "message": format!(
                "instrument {serial} is now number {number}; its HELLO no longer changes it"
            ),
        })),
        Err(response) => response,
    }
}

/// Enrols a serial number (`enrolment = approve`): the instrument is recorded with no
/// secret, so its next HELLO is issued one. `model` is what its refused HELLO named, when
/// the running server saw one.
pub fn instrument_approve(
    writer: &Writer,
    serial: &str,
    model: &str,
    by: &str,
    computer: &str,
) -> Response {
    let serial = serial.trim();
    let op = InstrumentApprove {
        actor: Actor {
            user: by.to_string(),
            computer: computer.to_string(),
        },
        serial: serial.to_string(),
        model: model.to_string(),
        at_ms: now_ms(),
    };
    match write_and_wait(writer, op) {
        Ok(()) => Response::ok(serde_json::json!({
            "serial": serial,
            "message": format!("instrument {serial} is approved; its next connection is enrolled and issued a secret"),
        })),
        Err(response) => response,
    }
}

/// Approves a serial number on the running server: the model its refused HELLO named is
/// recorded, and it no longer shows as pending.
pub fn approve_pending(
    writer: &Writer,
    registry: &crate::incubator::Registry,
    serial: &str,
    by: &str,
    computer: &str,
) -> Response {
    let serial = serial.trim();
    let model = registry
        .pending()
        .into_iter()
        .find(|p| p.serial == serial)
        .map(|p| p.model)
        .unwrap_or_default();
    let response = instrument_approve(writer, serial, &model, by, computer);
    if response.ok {
        registry.forget_refusals(serial);
        tracing::info!(%serial, %by, "instrument approved");
    }
    response
}

/// Runs one write through the storage writer and waits for it to be durable.
fn write_and_wait<O: Operation>(writer: &Writer, op: O) -> Result<O::Outcome, Response> {
    writer
        .write(op)
        .map_err(|error| Response::error(error.code(), error.to_string()))
}

use crate::now_ms;

/// User management: add, change password, disable, enable, unlock, list.
pub fn user(writer: &Writer, store: &Store, request: UserRequest) -> Response {
    let actor = |by: &str| Actor {
        user: by.to_string(),
        computer: "esserver user".to_string(),
    };
    let (result, done) = match request {
        UserRequest::List => {
            return match store.read().and_then(|reader| reader.users()) {
                Ok(users) => Response::ok(serde_json::json!({ "users": users })),
                Err(error) => Response::error(error.code(), error.to_string()),
            };
        }
        UserRequest::Add {
            name,
            password_hash,
            rights,
            by,
        } => {
            let Some(rights) = Rights::from_name(&rights) else {
                return Response::error(
                    "invalid_input",
                    format!("rights {rights:?} is not view, edit or admin"),
                );
            };
            let message = format!("user {name} added with the right `{rights}`");
            let op = UserAdd {
                actor: actor(&by),
                name,
                password_hash,
                rights,
                at_ms: now_ms(),
            };
            (write_and_wait(writer, op), message)
        }
        UserRequest::Passwd {
            name,
            password_hash,
            by,
        } => user_change(
            writer,
            actor(&by),
            name,
            UserChange::Password(password_hash),
            "password changed",
        ),
        UserRequest::Disable { name, by } => user_change(
            writer,
            actor(&by),
            name,
            UserChange::Disabled(true),
            "disabled",
        ),
        UserRequest::Enable { name, by } => user_change(
            writer,
            actor(&by),
            name,
            UserChange::Disabled(false),
            "enabled",
        ),
        UserRequest::Unlock { name, by } => {
            user_change(writer, actor(&by), name, UserChange::Unlock, "unlocked")
        }
    };
    match result {
        Ok(()) => Response::ok(serde_json::json!({ "message": done })),
        Err(response) => response,
    }
}

/// Public API keys: create, revoke, list.
/// The clinic's models: import a document, list, show one, evaluate one on embryos.
pub fn model(writer: &Writer, store: &Store, request: crate::control::ModelRequest) -> Response {
    use crate::control::ModelRequest;
    let actor = |by: &str| Actor {
        user: by.to_string(),
        computer: "esserver model".to_string(),
    };
    let read =
        |f: &dyn Fn(&es_storage::Reader) -> Result<Response, es_storage::StorageError>| match store
            .read()
            .and_then(|reader| f(&reader))
        {
            Ok(response) => response,
            Err(error) => Response::error(error.code(), error.to_string()),
        };
    match request {
        ModelRequest::Import { document, by } => {
            let op = es_storage::ModelImport {
                actor: actor(&by),
                document,
                at_ms: now_ms(),
            };
            match write_and_wait(writer, op) {
                Ok(done) => Response::ok(serde_json::json!({
                    "name": done.name,
                    "version": done.version,
                    "created": done.created,
                    "message": if done.created {
                        format!("model {} version {} imported", done.name, done.version)
                    } else {
                        format!(
                            "model {} version {} is this document already; nothing changed",
                            done.name, done.version
                        )
                    },
                })),
                Err(response) => response,
            }
        }
        ModelRequest::List => read(&|reader| {
            let models: Vec<serde_json::Value> = reader
                .models()?
                .into_iter()
                .map(|m| {
                    serde_json::json!({
                        "name": m.name, "version": m.version, "kind": m.kind, "used": m.used,
                        "imported_by": m.imported_by, "imported_at_ms": m.imported_at_ms,
                    })
                })
                .collect();
            Ok(Response::ok(serde_json::json!({ "models": models })))
        }),
        ModelRequest::Show { name, version } => read(&|reader| {
            Ok(match reader.model(&name, version)? {
                Some(model) => Response::ok(serde_json::to_value(&model).unwrap_or_default()),
                None => Response::error("not_found", format!("no model {name:?} in this store")),
            })
        }),
        ModelRequest::Evaluate {
            model,
            version,
            mut embryos,
            treatment,
            by,
        } => {
            if let Some((patient_id, name)) = &treatment {
                let found = store.read().and_then(|reader| {
                    let Some(dishes) = reader.treatment_dishes(patient_id, name)? else {
                        return Ok(None);
                    };
                    let mut ids = Vec::new();
                    for dish in dishes {
                        ids.extend(
                            reader
                                .dish_embryos(dish.dish_key)?
                                .into_iter()
                                .map(|e| e.embryo_id),
                        );
                    }
                    Ok(Some(ids))
                });
                match found {
                    Ok(Some(ids)) => embryos.extend(ids),
                    Ok(None) => {
                        return Response::error(
                            "not_found",
                            format!("no treatment {name:?} of patient {patient_id:?}"),
                        )
                    }
                    Err(error) => return Response::error(error.code(), error.to_string()),
                }
            }
            let mut results = Vec::new();
            for embryo_id in embryos {
                match evaluate_one(writer, store, &actor(&by), &embryo_id, &model, version) {
                    Ok(result) => results.push(result),
                    Err(response) => return response,
                }
            }
            Response::ok(serde_json::json!({ "results": results }))
        }
    }
}

/// Evaluates `model` on one embryo at its current version (read just before; a concurrent
/// edit makes it try again, a few times) and returns the stored result.
fn evaluate_one(
    writer: &Writer,
    store: &Store,
    actor: &Actor,
    embryo_id: &str,
    model: &str,
    version: Option<u32>,
) -> Result<serde_json::Value, Response> {
    const ATTEMPTS: u32 = 3;
    let storage =
        |error: es_storage::StorageError| Response::error(error.code(), error.to_string());
    for _ in 0..ATTEMPTS {
        let current = store
            .read()
            .and_then(|reader| reader.embryo(embryo_id))
            .map_err(storage)?
            .ok_or_else(|| Response::error("not_found", format!("no embryo {embryo_id}")))?;
        let op = es_storage::Edit {
            actor: actor.clone(),
            edit: es_storage::ClinicalEdit::Evaluate {
                embryo_id: embryo_id.to_string(),
                expected_version: current.version,
                model: model.to_string(),
                version,
            },
            idempotency: None,
            at_ms: now_ms(),
        };
        match writer.write(op) {
            Ok(_) => {
                let results = store
                    .read()
                    .and_then(|reader| reader.model_results(embryo_id))
                    .map_err(storage)?
                    .unwrap_or_default();
                let result = results.into_iter().find(|r| r.model == model);
                let mut value = serde_json::to_value(&result).unwrap_or_default();
                value["embryo_id"] = embryo_id.into();
                return Ok(value);
            }
            Err(es_storage::WriteError::Refused(es_storage::EditRefusal::Stale(_))) => continue,
            Err(error) => return Err(Response::error(error.code(), error.to_string())),
        }
    }
    Err(Response::error(
        "busy",
        format!("embryo {embryo_id} kept changing; evaluate it again"),
    ))
}

pub fn api_key(writer: &Writer, store: &Store, request: ApiKeyRequest) -> Response {
    let actor = |by: &str| Actor {
        user: by.to_string(),
        computer: "esserver apikey".to_string(),
    };
    let (result, done) = match request {
        ApiKeyRequest::List => {
            return match store.read().and_then(|reader| reader.api_keys()) {
                Ok(keys) => Response::ok(serde_json::json!({ "keys": keys })),
                Err(error) => Response::error(error.code(), error.to_string()),
            };
        }
        ApiKeyRequest::Create {
            key_id,
            name,
            scope,
            secret_sha256,
            by,
        } => {
            let Some(scope) = ApiScope::from_name(&scope) else {
                return Response::error(
                    "invalid_input",
                    format!("scope {scope:?} is not read or write"),
                );
            };
            let mut digest = [0u8; 32];
            if hex::decode_to_slice(&secret_sha256, &mut digest).is_err() {
                return Response::error("invalid_input", "the secret's SHA-256 is not 64 hex");
            }
            let message = format!("API key {key_id} ({name}) created with scope `{scope}`");
            let op = ApiKeyCreate {
                actor: actor(&by),
                key_id,
                name,
                scope,
                secret_sha256: digest,
                at_ms: now_ms(),
            };
            (write_and_wait(writer, op), message)
        }
        ApiKeyRequest::Revoke { key_id, by } => {
            let message = format!("API key {key_id} revoked; it can no longer be used");
            let op = ApiKeyRevoke {
                actor: actor(&by),
                key_id,
                at_ms: now_ms(),
            };
            (write_and_wait(writer, op), message)
        }
    };
    match result {
        Ok(()) => Response::ok(serde_json::json!({ "message": done })),
        Err(response) => response,
    }
}

fn user_change(
    writer: &Writer,
    actor: Actor,
    name: String,
    change: UserChange,
    done: &str,
) -> (Result<(), Response>, String) {
    let message = format!("user {name}: {done}");
    let op = UserUpdate {
        actor,
        name,
        change,
        at_ms: now_ms(),
    };
    (write_and_wait(writer, op), message)
}

/// Runs `request` on the live server, or on the database directly when none runs.
pub fn run(config: &Config, request: Request) -> Result<Response, String> {
    run_with_progress(config, request, &mut |_| {})
}

/// [`run`], handing the progress of a long request (a backup) to `progress`.
pub fn run_with_progress(
    config: &Config,
    request: Request,
    progress: control::ProgressSink<'_>,
) -> Result<Response, String> {
    let data_dir = &config.storage.data_dir;
    match control::call_with_progress(data_dir, &request, progress) {
        Ok(Some(response)) => return Ok(response),
        Ok(None) => {}
        Err(error) => {
            return Err(format!(
                "cannot reach the server's control socket in {}: {error}",
                data_dir.display()
            ))
        }
    }
    offline(config, data_dir, request, progress)
}

fn offline(
    config: &Config,
    data_dir: &Path,
    request: Request,
    progress: control::ProgressSink<'_>,
) -> Result<Response, String> {
    // The first administrator may be created before the server's first start.
    let creates = matches!(
        request,
        Request::User {
            action: UserRequest::Add { .. }
        }
    );
    if !creates && !data_dir.join(es_storage::DATABASE_FILE_NAME).exists() {
        return Err(format!(
            "no esserver database in {} (start the server once, or name the directory with --data)",
            data_dir.display()
        ));
    }
    let options = StoreOptions {
        cache_bytes: config.storage.cache_bytes,
        volume_bytes_max: config.storage.volume_bytes_max,
        volume_direct_io: config.storage.volume_direct_io,
        quick_repair: config.storage.quick_repair,
        // A migration run by an offline command mints PatientIDx values with it.
        site_name: config.clinic.site_name(),
        ..StoreOptions::default()
    };
    if matches!(request, Request::Verify) {
        // Checking changes nothing: the store is opened read-only.
        let store = Store::open_read_only(data_dir, &options).map_err(|error| {
            format!(
                "cannot open the database in {} read-only: {error}",
                data_dir.display()
            )
        })?;
        return Ok(verify_report(&store));
    }
    // The seed names a database created here; an existing one keeps its server id.
    let mut seed = [0u8; 16];
    getrandom::fill(&mut seed).map_err(|error| format!("no randomness: {error}"))?;
    let store = Store::open(data_dir, &options, seed).map_err(|error| {
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
                    "database_bytes": std::fs::metadata(store.path()).map(|m| m.len()).ok(),
                    "volumes_dir": store.volumes_dir(),
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
        Request::User { action } => {
            let writer = store.start_writer(es_storage::WriterOptions::default());
            let response = user(&writer, &store, action);
            writer.shutdown();
            response
        }
        Request::ApiKey { action } => {
            let writer = store.start_writer(es_storage::WriterOptions::default());
            let response = api_key(&writer, &store, action);
            writer.shutdown();
            response
        }
        Request::Model { action } => {
            let writer = store.start_writer(es_storage::WriterOptions::default());
            let response = model(&writer, &store, action);
            writer.shutdown();
            response
        }
        Request::InstrumentRename {
            serial,
            display_name,
            by,
        } => {
            let writer = store.start_writer(es_storage::WriterOptions::default());
            let response = instrument_rename(&writer, &serial, &display_name, &by);
            writer.shutdown();
            response
        }
        Request::InstrumentNumber { serial, number, by } => {
            let writer = store.start_writer(es_storage::WriterOptions::default());
            let response = instrument_number(&writer, &serial, number, &by);
            writer.shutdown();
            response
        }
        Request::InstrumentApprove { serial, by } => {
            let writer = store.start_writer(es_storage::WriterOptions::default());
            let response = instrument_approve(&writer, &serial, "", &by, "esserver instrument");
            writer.shutdown();
            response
        }
        Request::LicenseInstall { text } => {
            let loaded = crate::license::Licensing::load(
                data_dir,
                &config.license.trusted_keys,
                &store.server_id(),
                now_ms(),
            );
            match loaded {
                Ok(licensing) => match licensing.install(text.as_bytes(), now_ms()) {
                    Ok(license) => Response::ok(serde_json::json!({
                        "message": format!(
                            "licence {} for {} installed; the server uses it at its next start",
                            license.license_id, license.clinic
                        ),
                    })),
                    Err(error) => Response::error(error.code(), format!("not installed: {error}")),
                },
                Err(detail) => Response::error("license_unreadable", detail),
            }
        }
        Request::Backup { to } => {
            let never = std::sync::atomic::AtomicBool::new(false);
            match crate::backup::Target::parse(&to) {
                Ok(target) => {
                    crate::backup::run(&store, &target, data_dir, &config.archive, progress, &never)
                }
                Err(message) => Response::error("invalid_input", message),
            }
        }
        Request::Archive | Request::ArchiveCheck { .. } => {
            if config.archive.target.is_none() {
                return Ok(Response::error(
                    "archive_off",
                    "no [Archive] target is configured in EmbryoServer.ini; nothing is archived",
                ));
            }
            let writer = store.start_writer(es_storage::WriterOptions::default());
            let response =
                match crate::archive::Archive::new(&config.archive, &store, &writer, data_dir) {
                    Ok(archive) => match request {
                        Request::ArchiveCheck { full } => archive.check(full, progress),
                        _ => archive.run_now(progress),
                    },
                    Err(detail) => Response::error("archive_config", detail),
                };
            writer.shutdown();
            response
        }
        Request::Ims { action } => match action {
            crate::control::ImsRequest::Status => {
                match store.read().and_then(|reader| reader.ims_stats()) {
                    Ok(queue) => Response::ok(serde_json::json!({
                        "server_running": false,
                        "receive": config.ims.receive,
                        "upload": config.ims.upload,
                        "endpoint": config.ims.endpoint.as_ref().map(crate::ims::Endpoint::url),
                        "queue": queue,
                        "queue_bytes_max": config.ims.queue_bytes_max,
                    })),
                    Err(error) => Response::error(error.code(), error.to_string()),
                }
            }
            crate::control::ImsRequest::Set { .. } => Response::error(
                "server_not_running",
                "no server is running; the switches act on a running server. To change the \
                 default, set receive or upload in the [IMS] section of the configuration file"
                    .to_owned(),
            ),
        },
    })
}
