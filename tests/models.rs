//! Models on a running server, as a clinic uses them: a model document imported with
//! `esserver model import`, evaluated through the public API (If-Match, answered with the
//! embryo and its new version), its result listed with the rule and variables; recomputed when
//! a viewer changes an annotation; exported and
//! imported into another server, where the same annotations give the identical result. The
//! viewer protocol's model messages: import (rights, located errors), list, get, evaluate
//! (versioned), results, and the activity curve.

mod common;

use common::START_MS;
use es_loadtest::http_client::HttpClient;
use es_loadtest::spawn::ServerProcess;
use es_loadtest::viewer_client::{Credentials, ViewerClient};
use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
use serde_json::{json, Value};
use std::process::Command;

const PASSWORD: &str = "Models-2026!";
const MODEL: &str = "Hierarchical after Meseguer 2011";

fn meseguer() -> String {
    let cases: Value =
        serde_json::from_str(include_str!("../storage/models/tests/cases.json")).unwrap();
    serde_json::to_string_pretty(&cases["models"]["meseguer"]).unwrap()
}

fn esserver(server: &ServerProcess, args: &[&str]) -> std::process::Output {
    Command::new(common::esserver_path())
        .args(args)
        .arg("--data")
        .arg(server.data_dir())
        .output()
        .expect("esserver runs")
}

/// A server with one dish (3 embryos), a viewer user and a write key.
fn clinic(serial: &str) -> (ServerProcess, tempfile::TempDir, String) {
    let (server, dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    common::upload_dish(&server, serial, 2);
    let key = common::create_api_key(&server, "models test", "write");
    (server, dir, key)
}

fn log_in(server: &ServerProcess) -> ViewerClient {
    ViewerClient::login(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &Credentials {
            user: "anna".into(),
            password: PASSWORD.into(),
            computer: "VIEWER-1".into(),
        },
        common::TIMEOUT,
    )
    .unwrap()
}

fn version(viewer: &mut ViewerClient, embryo_id: &str) -> u64 {
    match viewer
        .call(Request::GetEmbryo(pb::GetEmbryo {
            embryo_id: embryo_id.into(),
        }))
        .unwrap()
    {
        Body::Embryo(embryo) => embryo.version,
        other => panic!("{other:?}"),
    }
}

/// Annotates a timing event at `hours` after insemination (the dish's, START_MS - 1 h).
fn annotate(viewer: &mut ViewerClient, embryo_id: &str, name: &str, hours: f64) {
    let expected_version = version(viewer, embryo_id);
    let request = Request::AddAnnotation(pb::AddAnnotation {
        embryo_id: embryo_id.into(),
        expected_version,
        annotation: Some(pb::AnnotationInput {
            name: name.into(),
            value: String::new(),
            event_at_ms: START_MS - 3_600_000 + (hours * 3_600_000.0).round() as i64,
            has_event: true,
            source: "manual".into(),
        }),
    });
    viewer.call(request).unwrap();
}

struct Api {
    http: HttpClient,
    auth: String,
}

impl Api {
    fn new(server: &ServerProcess, key: &str) -> Api {
        Api {
            http: HttpClient::new(
                server.info.address("public-api"),
                server.info.client_tls("public-api"),
                common::TIMEOUT,
            ),
            auth: format!("Bearer {key}"),
        }
    }

    fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut all = vec![("authorization", self.auth.as_str())];
        all.extend_from_slice(headers);
        let body = body.map(|b| b.to_string());
        if body.is_some() {
            all.push(("content-type", "application/json"));
        }
        let response = self
            .http
            .request(method, path, &all, body.as_deref().map(str::as_bytes))
            .unwrap();
        (response.status, response.json())
    }
}

/// Evaluates the model on `embryo_id` through the API; returns its result.
fn evaluate(api: &mut Api, embryo_id: &str) -> Value {
    let path = format!("/api/v1/embryos/{embryo_id}");
    let (status, embryo) = api.call("GET", &path, &[], None);
    assert_eq!(status, 200, "{embryo}");
    let etag = format!("\"{}\"", embryo["version"]);
    let (status, answer) = api.call(
        "POST",
        &format!("{path}/evaluations"),
        &[("if-match", etag.as_str())],
        Some(json!({ "model": MODEL })),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["version"], embryo["version"].as_u64().unwrap() + 1);
    result(api, embryo_id)
}

fn result(api: &mut Api, embryo_id: &str) -> Value {
    let (status, list) = api.call(
        "GET",
        &format!("/api/v1/embryos/{embryo_id}/evaluations"),
        &[],
        None,
    );
    assert_eq!(status, 200, "{list}");
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == MODEL)
        .cloned()
        .expect("a result of the model")
}

#[test]
fn a_model_is_imported_evaluated_recomputed_and_gives_the_same_result_on_another_server() {
    let (server, dir, key) = clinic("MD-1");
    let file = dir.path().join("meseguer.json");
    std::fs::write(&file, meseguer()).unwrap();
    let imported = esserver(&server, &["model", "import", file.to_str().unwrap()]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    assert!(String::from_utf8_lossy(&imported.stdout).contains("version 1 imported"));
    // A mistaken document is named with its place, and nothing is imported.
    std::fs::write(
        &file,
        meseguer().replace("\"below\": 0.77", "\"below\": \"x\""),
    )
    .unwrap();
    let refused = esserver(&server, &["model", "import", file.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("invalid model: line"));

    // Case M1's timings on embryo 1, through a viewer.
    let embryo_id = "MD-1_S1_P-1";
    let mut viewer = log_in(&server);
    for (name, hours) in [("t2", 26.1), ("t3", 37.4), ("t4", 38.0), ("t5", 50.2)] {
        annotate(&mut viewer, embryo_id, name, hours);
    }
    let mut api = Api::new(&server, &key);
    let first = evaluate(&mut api, embryo_id);
    assert_eq!(first["value"], "A+", "{first}");
    assert_eq!(first["version"], 1);
    assert_eq!(first["variables"]["s2"], 0.6);
    assert_eq!(
        first["rule"],
        "t5 in [48.8, 56.61) -> s2 < 0.77 -> cc2 < 11.91 -> A+"
    );
    // The version used is marked so: it never changes again.
    let (status, models) = api.call("GET", "/api/v1/models", &[], None);
    assert_eq!(status, 200);
    assert_eq!(models["items"][0]["used"], true, "{models}");

    // A viewer changes an input: the result follows (t5 late: out of the range, C+).
    annotate(&mut viewer, embryo_id, "t5", 58.0);
    let after = result(&mut api, embryo_id);
    assert_eq!(after["value"], "C+", "{after}");
    assert_eq!(after["set_by"], "anna");

    // Exported, imported into another server: the same annotations give the same result.
    let exported = dir.path().join("exported.json");
    let export = esserver(
        &server,
        &[
            "model",
            "export",
            MODEL,
            "--out",
            exported.to_str().unwrap(),
        ],
    );
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let (other, _other_dir, other_key) = clinic("MD-1");
    // Imported there through the API: a read key may not, a write key may (the same document
    // again changes nothing).
    let document: Value = serde_json::from_slice(&std::fs::read(&exported).unwrap()).unwrap();
    let read_key = common::create_api_key(&other, "reader", "read");
    let mut reader_api = Api::new(&other, &read_key);
    let (status, _) = reader_api.call("POST", "/api/v1/models", &[], Some(document.clone()));
    assert_eq!(status, 403);
    let mut other_api = Api::new(&other, &other_key);
    let (status, imported) = other_api.call("POST", "/api/v1/models", &[], Some(document.clone()));
    assert_eq!(
        (status, imported["version"].as_u64()),
        (201, Some(1)),
        "{imported}"
    );
    let (status, again) = other_api.call("POST", "/api/v1/models", &[], Some(document));
    assert_eq!(
        (status, again["created"].as_bool()),
        (200, Some(false)),
        "{again}"
    );
    let mut other_viewer = log_in(&other);
    for (name, hours) in [
        ("t2", 26.1),
        ("t3", 37.4),
        ("t4", 38.0),
        ("t5", 50.2),
        ("t5", 58.0),
    ] {
        annotate(&mut other_viewer, embryo_id, name, hours);
    }
    let there = evaluate(&mut other_api, embryo_id);
    for field in ["value", "rule", "variables", "version", "outcome"] {
        assert_eq!(there[field], after[field], "{field}");
    }
    let list = esserver(&other, &["model", "list", "--json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["models"].as_array().unwrap().len(), 1);
}

fn server_error(result: Result<Body, es_loadtest::viewer_client::ViewerError>) -> (String, String) {
    match result {
        Err(es_loadtest::viewer_client::ViewerError::Server { name, message, .. }) => {
            (name, message)
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn models_are_imported_listed_and_evaluated_through_the_viewer_protocol() {
    let (server, _dir, _key) = clinic("MV-1");
    common::add_user(&server, "victor", "view", PASSWORD);
    let mut viewer = log_in(&server);
    let import = |document: String| Request::ImportModel(pb::ImportModel { document });

    // A mistaken document is refused with its place; a user with view rights may not import.
    let broken = meseguer().replace("\"below\": 0.77", "\"below\": \"x\"");
    let (code, message) = server_error(viewer.call(import(broken)));
    assert_eq!(code, "invalid_field");
    assert!(message.contains("line"), "{message}");
    let mut looker = ViewerClient::login(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &Credentials {
            user: "victor".into(),
            password: PASSWORD.into(),
            computer: "VIEWER-2".into(),
        },
        common::TIMEOUT,
    )
    .unwrap();
    let (code, _) = server_error(looker.call(import(meseguer())));
    assert_eq!(code, "permission_denied");

    let Body::ModelImported(first) = viewer.call(import(meseguer())).unwrap() else {
        panic!("not ModelImported");
    };
    assert_eq!(
        (first.name.as_str(), first.version, first.created),
        (MODEL, 1, true)
    );
    let Body::ModelImported(again) = viewer.call(import(meseguer())).unwrap() else {
        panic!("not ModelImported");
    };
    assert_eq!((again.version, again.created), (1, false));
    let Body::ModelList(list) = looker.call(Request::ListModels(pb::ListModels {})).unwrap() else {
        panic!("not ModelList");
    };
    assert_eq!(list.models.len(), 1);
    assert_eq!(list.models[0].kind, "hierarchical");
    let Body::Model(model) = looker
        .call(Request::GetModel(pb::GetModel {
            name: MODEL.into(),
            version: 0,
        }))
        .unwrap()
    else {
        panic!("not ModelDocument");
    };
    assert_eq!(model.document, meseguer());
    let (code, _) = server_error(looker.call(Request::GetModel(pb::GetModel {
        name: MODEL.into(),
        version: 9,
    })));
    assert_eq!(code, "not_found");

    // Case M1's timings, evaluated through the viewer: saved like an edit, versioned.
    let embryo_id = "MV-1_S1_P-1";
    for (name, hours) in [("t2", 26.1), ("t3", 37.4), ("t4", 38.0), ("t5", 50.2)] {
        annotate(&mut viewer, embryo_id, name, hours);
    }
    let before = version(&mut viewer, embryo_id);
    let evaluate = |expected_version: u64| {
        Request::Evaluate(pb::Evaluate {
            embryo_id: embryo_id.into(),
            expected_version,
            model: MODEL.into(),
            version: 0,
        })
    };
    let (code, _) = server_error(looker.call(evaluate(before)));
    assert_eq!(code, "permission_denied", "view rights may not evaluate");
    let Body::Saved(saved) = viewer.call(evaluate(before)).unwrap() else {
        panic!("not Saved");
    };
    assert_eq!(saved.version, before + 1);
    let (code, _) = server_error(viewer.call(evaluate(before)));
    assert_eq!(code, "conflict", "a stale version is refused");
    let Body::EvaluationList(results) = looker
        .call(Request::ListEvaluations(pb::ListEvaluations {
            embryo_id: embryo_id.into(),
        }))
        .unwrap()
    else {
        panic!("not EvaluationList");
    };
    let result = &results.evaluations[0];
    assert_eq!((result.model.as_str(), result.version), (MODEL, 1));
    assert_eq!(
        (result.outcome.as_str(), result.value.as_str()),
        ("category", "A+")
    );
    assert_eq!(
        result.rule,
        "t5 in [48.8, 56.61) -> s2 < 0.77 -> cc2 < 11.91 -> A+"
    );
    assert!(result
        .variables
        .iter()
        .any(|v| v.name == "s2" && (v.value - 0.6).abs() < 1e-9));
    assert_eq!(result.set_by, "anna");

    // The activity curve of the same embryo (two acquisitions uploaded: one point at most).
    let Body::Activity(curve) = looker
        .call(Request::GetActivity(pb::GetActivity {
            embryo_id: embryo_id.into(),
        }))
        .unwrap()
    else {
        panic!("not Activity");
    };
    assert_eq!(curve.embryo_id, embryo_id);
    assert!(curve.points.len() <= 1, "{curve:?}");
    assert!(curve
        .points
        .iter()
        .all(|p| (0.0..=1.0).contains(&p.activity)));
    let (code, _) = server_error(looker.call(Request::GetActivity(pb::GetActivity {
        embryo_id: "NO-SUCH".into(),
    })));
    assert_eq!(code, "not_found");
}
