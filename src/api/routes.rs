//! The REST API v1 (`/api/v1/...`), run on a worker: authentication, routing, reads and
//! the building of writes. The JSON shapes are described in `docs/api/openapi.json`, which
//! the contract test checks the server against.

use super::auth::{self, Principal, Refused};
use super::{
    compat, ApiMsg, ApiShared, LoginKind, Render, Response, Step, ZipPlan, CHANGES_WAIT_MAX,
};
use crate::accounts::{check_password, LoginCheck};
use crate::edits::{self, Editor};
use crate::now_ms;
use crate::times::{iso_utc, parse_iso_utc};
use es_net::http::Request;
use es_net::ConnHandle;
use es_storage::{
    AdminRefusal, AnnotationRecord, Change, ClinicalEdit, DishRecord, Edit, EditRefusal, Edited,
    EmbryoRecord, Fate, Idempotency, LoginAttempt, OpResult, PatientRecord, PatientRef, Reader,
    ScoreInput, StorageError, SubmitError, TransferOutcome, TransferRecord, TreatmentRecord,
    WriteError,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Items per page unless `limit` says otherwise.
pub const PAGE_DEFAULT: u32 = 100;
/// Items per page at most.
pub const PAGE_MAX: u32 = 1000;
/// Longest Idempotency-Key accepted, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

/// The OpenAPI description, served as it is in `docs/api/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../../docs/api/openapi.json");

/// A refusal before any work: the response to send.
type Refusal = Box<Response>;

fn refuse(status: u16, code: &str, message: impl Into<String>) -> Refusal {
    Box::new(Response::error(status, code, message))
}

/// Handles one request on a worker; `caller` is set to who made it once that is known (the
/// key or user, for the request log).
pub(super) fn handle(
    shared: &ApiShared,
    request: &Request,
    peer: SocketAddr,
    handle: &ConnHandle<ApiMsg>,
    caller: &mut Option<String>,
) -> Step {
    // A read that panics (a dependency meeting damaged data) ends its request with an error
    // rather than never answering it.
    let routed = es_storage::guarded("a public API request", || {
        Ok(route(shared, request, peer, handle, caller))
    });
    match routed {
        Ok(Ok(step)) => step,
        Ok(Err(response)) => Step::Respond(*response),
        Err(error) => Step::Respond(Response::storage(&error)),
    }
}

/// One request on its way through the route table: what every handler may use.
struct Call<'a> {
    shared: &'a ApiShared,
    request: &'a Request,
    peer: SocketAddr,
    handle: &'a ConnHandle<ApiMsg>,
    /// Who made the request, for the request log, once known.
    caller: &'a mut Option<String>,
    /// The authenticated caller; None on the public routes (openapi.json, login).
    principal: Option<Principal>,
    /// The path's variable segments, in order (`{patient_id}`, `{treatment_name}`, ...).
    params: Vec<&'a str>,
}

impl Call<'_> {
    fn principal(&self) -> &Principal {
        self.principal
            .as_ref()
            .expect("the route table authenticates every route that is not public")
    }

    fn param(&self, index: usize) -> &str {
        self.params[index]
    }

    /// A clinical edit through the one edit path; `render` says how to answer once durable.
    fn submit(&self, edit: ClinicalEdit, render: Render) -> Result<Step, Refusal> {
        submit(
            self.shared,
            self.request,
            self.principal(),
            self.peer,
            edit,
            render,
            self.handle,
        )
    }

    fn read(
        &self,
        read: impl FnOnce(&Reader) -> Result<Response, ReadFailure>,
    ) -> Result<Step, Refusal> {
        read_step(self.shared, read)
    }
}

type Handler = fn(&mut Call<'_>) -> Result<Step, Refusal>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// Also answers HEAD (the head of what GET sends).
    Get,
    Put,
    Post,
}

impl Method {
    fn answers(self, method: &str) -> bool {
        match self {
            Method::Get => method == "GET" || method == "HEAD",
            Method::Put => method == "PUT",
            Method::Post => method == "POST",
        }
    }

    fn names(self) -> &'static [&'static str] {
        match self {
            Method::Get => &["GET", "HEAD"],
            Method::Put => &["PUT"],
            Method::Post => &["POST"],
        }
    }
}

/// A resource under `/api/v1`: its path (`{name}` for a variable segment, named as in the
/// OpenAPI document) and the handler of each method it answers.
struct Route {
    path: &'static str,
    /// Served without a credential (and without a licence check).
    public: bool,
    methods: &'static [(Method, Handler)],
}

/// Every resource of the REST API. Dispatch, the `405` answer with its `Allow` header, and the
/// test that compares with `docs/api/openapi.json` all read this table: adding a route is one
/// entry here (and its description in the OpenAPI document).
const ROUTES: &[Route] = &[
    Route {
        path: "openapi.json",
        public: true,
        methods: &[(Method::Get, openapi)],
    },
    Route {
        path: "login",
        public: true,
        methods: &[(Method::Post, login)],
    },
    Route {
        path: "logout",
        public: false,
        methods: &[(Method::Post, logout)],
    },
    Route {
        path: "patients",
        public: false,
        methods: &[(Method::Get, patients_list), (Method::Post, patient_create)],
    },
    Route {
        path: "patients/{patient_id}",
        public: false,
        methods: &[(Method::Get, patient_get), (Method::Put, patient_update)],
    },
    Route {
        path: "patients/{patient_id}/treatments/{treatment_name}",
        public: false,
        methods: &[
            (Method::Get, treatment_get),
            (Method::Put, treatment_update),
        ],
    },
    Route {
        path: "patients/{patient_id}/treatments/{treatment_name}/embryos",
        public: false,
        methods: &[(Method::Get, treatment_embryos_list)],
    },
    Route {
        path: "patients/{patient_id}/treatments/{treatment_name}/transfers",
        public: false,
        methods: &[
            (Method::Get, transfers_list),
            (Method::Post, transfer_create),
        ],
    },
    Route {
        path: "transfers/{transfer_id}",
        public: false,
        methods: &[(Method::Get, transfer_get)],
    },
    Route {
        path: "transfers/{transfer_id}/outcome",
        public: false,
        methods: &[(Method::Put, transfer_outcome)],
    },
    Route {
        path: "embryos/{embryo_id}",
        public: false,
        methods: &[(Method::Get, embryo_get)],
    },
    Route {
        path: "embryos/{embryo_id}/fate",
        public: false,
        methods: &[(Method::Put, embryo_fate)],
    },
    Route {
        path: "embryos/{embryo_id}/scores/{model}",
        public: false,
        methods: &[(Method::Put, embryo_score)],
    },
    Route {
        path: "embryos/{embryo_id}/evaluations",
        public: false,
        methods: &[
            (Method::Get, evaluations_list),
            (Method::Post, evaluation_post),
        ],
    },
    Route {
        path: "embryos/{embryo_id}/activity",
        public: false,
        methods: &[(Method::Get, activity_get)],
    },
    Route {
        path: "embryos/{embryo_id}/activity/plot",
        public: false,
        methods: &[(Method::Get, activity_plot)],
    },
    Route {
        path: "embryos/{embryo_id}/activity/proposals/{event}",
        public: false,
        methods: &[(Method::Post, proposal_accept)],
    },
    Route {
        path: "models",
        public: false,
        methods: &[(Method::Get, models_list), (Method::Post, model_post)],
    },
    Route {
        path: "models/{model_name}",
        public: false,
        methods: &[(Method::Get, model_get)],
    },
    Route {
        path: "embryos/{embryo_id}/acquisitions",
        public: false,
        methods: &[(Method::Get, acquisitions_list)],
    },
    Route {
        path: "embryos/{embryo_id}/images/{acquired_at_ms}",
        public: false,
        methods: &[(Method::Get, image_get)],
    },
    Route {
        path: "embryos/{embryo_id}/timelapse",
        public: false,
        methods: &[(Method::Get, timelapse_get)],
    },
    Route {
        path: "changes",
        public: false,
        methods: &[(Method::Get, changes_get)],
    },
];

impl Route {
    /// The variable segments of `at` when it is this route's path.
    fn matches<'a>(&self, at: &[&'a str]) -> Option<Vec<&'a str>> {
        let mut params = Vec::new();
        let mut pattern = self.path.split('/');
        for segment in at {
            let expected = pattern.next()?;
            if expected.starts_with('{') {
                params.push(*segment);
            } else if expected != *segment {
                return None;
            }
        }
        pattern.next().is_none().then_some(params)
    }

    fn handler(&self, method: &str) -> Option<Handler> {
        self.methods
            .iter()
            .find(|(answers, _)| answers.answers(method))
            .map(|(_, handler)| *handler)
    }

    /// The `Allow` header of a 405: every method the resource answers.
    fn allow(&self) -> String {
        let names: Vec<&str> = self
            .methods
            .iter()
            .flat_map(|(method, _)| method.names().iter().copied())
            .collect();
        names.join(", ")
    }
}

fn route(
    shared: &ApiShared,
    request: &Request,
    peer: SocketAddr,
    handle: &ConnHandle<ApiMsg>,
    caller: &mut Option<String>,
) -> Result<Step, Refusal> {
    let segments: Vec<&str> = request.segments.iter().map(String::as_str).collect();
    let method = request.method.as_str();
    // The original server did not care about the case of `/LOGIN` and `/GET`.
    let legacy_login =
        matches!(segments.as_slice(), [login] if login.eq_ignore_ascii_case("login"));
    let legacy_call = match segments.as_slice() {
        [get, name] if get.eq_ignore_ascii_case("get") => Some(*name),
        _ => None,
    };
    if legacy_login || legacy_call.is_some() {
        if !Method::Get.answers(method) {
            return Err(method_not_allowed("GET"));
        }
        return match legacy_call {
            Some(name) => compat::call(shared, request, name),
            None => compat::login(shared, request, peer, handle),
        };
    }
    let not_found = || {
        refuse(
            404,
            "not_found",
            format!("no such resource: {}", request.path),
        )
    };
    let ["api", "v1", at @ ..] = segments.as_slice() else {
        return Err(not_found());
    };
    let found = |public: bool| {
        ROUTES
            .iter()
            .filter(|route| route.public == public)
            .find_map(|route| route.matches(at).map(|params| (route, params)))
    };
    // The public routes answer without a credential; everything else is authenticated
    // before it is told apart (an unknown resource too).
    let (route, params, principal) = match found(true) {
        Some((route, params)) => (route, params, None),
        None => {
            let principal = authenticate(shared, request)?;
            *caller = Some(principal.id.clone());
            let (route, params) = found(false).ok_or_else(not_found)?;
            (route, params, Some(principal))
        }
    };
    let handler = route
        .handler(method)
        .ok_or_else(|| method_not_allowed(&route.allow()))?;
    handler(&mut Call {
        shared,
        request,
        peer,
        handle,
        caller,
        principal,
        params,
    })
}

fn method_not_allowed(allowed: &str) -> Refusal {
    Box::new(
        Response::error(
            405,
            "method_not_allowed",
            format!("this resource answers {allowed} only"),
        )
        .with_header("allow", allowed),
    )
}

// ---------------------------------------------------------------- handlers

fn openapi(_: &mut Call<'_>) -> Result<Step, Refusal> {
    Ok(Step::Respond(
        Response {
            status: 200,
            headers: vec![("content-type", "application/json".into())],
            body: bytes::Bytes::from_static(OPENAPI_JSON.as_bytes()),
        }
        .with_header("cache-control", "no-cache"),
    ))
}

fn login(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let body: LoginBody = json_body(call.request)?;
    *call.caller = Some(format!("login:{}", body.username));
    start_login(
        call.shared,
        &body.username,
        &body.password,
        LoginKind::Rest,
        call.peer,
        call.handle,
    )
}

fn logout(call: &mut Call<'_>) -> Result<Step, Refusal> {
    if let Some(credential) = auth::credential(call.request) {
        call.shared.tokens.revoke(credential);
    }
    Ok(Step::Respond(Response {
        status: 204,
        headers: Vec::new(),
        body: bytes::Bytes::new(),
    }))
}

fn patients_list(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let request = call.request;
    call.read(|r| list_patients(r, request))
}

fn patient_create(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let body: PatientBody = json_body(call.request)?;
    if !usable_in_path(&body.patient_id) {
        return Err(refuse(
            422,
            "invalid_input",
            "a patient id has no control characters and is not . or .. \
             (it must be usable as a path segment)",
        ));
    }
    let edit = ClinicalEdit::CreatePatient {
        patient: body.into_ref(),
    };
    let render = Render::Patient {
        patient_id: patient_id_of(&edit),
        created: true,
    };
    call.submit(edit, render)
}

fn patient_get(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let patient_id = call.param(0);
    call.read(|r| {
        let patient = r
            .patient(patient_id)?
            .ok_or_else(|| not_found(format!("patient {patient_id}")))?;
        Ok(tagged(patient_json(&patient), patient.version))
    })
}

fn patient_update(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let patient_id = call.param(0).to_string();
    let body: PatientUpdateBody = json_body(call.request)?;
    let expected_version = if_match(call.request)?;
    let edit = ClinicalEdit::UpdatePatient {
        patient: PatientRef {
            patient_idx: String::new(),
            patient_id: patient_id.clone(),
            first_name: body.first_name,
            last_name: body.last_name,
            date_of_birth: body.date_of_birth,
        },
        expected_version,
    };
    let render = Render::Patient {
        patient_id,
        created: false,
    };
    call.submit(edit, render)
}

fn treatment_get(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let (patient_id, name) = (call.param(0), call.param(1));
    call.read(|r| {
        let treatment = r
            .treatment(patient_id, name)?
            .ok_or_else(|| not_found(format!("treatment {patient_id}/{name}")))?;
        let dishes = r.treatment_dishes(patient_id, name)?.unwrap_or_default();
        let mut value = treatment_json(&treatment);
        value["dishes"] = dishes.iter().map(dish_json).collect();
        Ok(tagged(value, treatment.version))
    })
}

fn treatment_update(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let (patient_id, name) = (call.param(0).to_string(), call.param(1).to_string());
    let body: TreatmentBody = json_body(call.request)?;
    let expected_version = if_match(call.request)?;
    let edit = ClinicalEdit::UpdateTreatment {
        patient_id: patient_id.clone(),
        name: name.clone(),
        comment: body.comment,
        expected_version,
    };
    call.submit(edit, Render::Treatment { patient_id, name })
}

fn treatment_embryos_list(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let (patient_id, name, request) = (call.param(0), call.param(1), call.request);
    call.read(|r| {
        let embryos = treatment_embryos(r, patient_id, name)?
            .ok_or_else(|| not_found(format!("treatment {patient_id}/{name}")))?;
        let (items, next) = page_by_index(request, &embryos)?;
        Ok(Response::json(
            200,
            &json!({ "items": items.iter().map(embryo_json).collect::<Vec<_>>(), "next_after": next }),
        ))
    })
}

fn transfers_list(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let (patient_id, name, request) = (call.param(0), call.param(1), call.request);
    call.read(|r| {
        let transfers = r
            .treatment_transfers(patient_id, name)?
            .ok_or_else(|| not_found(format!("treatment {patient_id}/{name}")))?;
        let (items, next) = page_by_index(request, &transfers)?;
        Ok(Response::json(
            200,
            &json!({ "items": items.iter().map(transfer_json).collect::<Vec<_>>(), "next_after": next }),
        ))
    })
}

fn transfer_create(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let body: TransferBody = json_body(call.request)?;
    let transferred_at_ms = instant_field("transferred_at", &body.transferred_at)?;
    let edit = ClinicalEdit::CreateTransfer {
        patient_id: call.param(0).to_string(),
        treatment_name: call.param(1).to_string(),
        transferred_at_ms,
        embryo_ids: body.embryo_ids,
        comment: body.comment,
    };
    call.submit(edit, Render::Transfer { created: true })
}

fn transfer_get(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let transfer_key = number_segment("transfer number", call.param(0))?;
    call.read(|r| {
        let transfer = r
            .transfer(transfer_key)?
            .ok_or_else(|| not_found(format!("transfer {transfer_key}")))?;
        Ok(tagged(transfer_json(&transfer), transfer.version))
    })
}

fn transfer_outcome(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let transfer_key = number_segment("transfer number", call.param(0))?;
    let body: OutcomeBody = json_body(call.request)?;
    let expected_version = if_match(call.request)?;
    let edit = ClinicalEdit::UpdateTransfer {
        transfer_key,
        expected_version,
        outcome: TransferOutcome {
            gestational_sacs: body.gestational_sacs,
            fetal_heartbeats: body.fetal_heartbeats,
            clinical_pregnancy: body.clinical_pregnancy,
            live_birth: body.live_birth,
        },
        comment: body.comment,
    };
    call.submit(edit, Render::Transfer { created: false })
}

fn embryo_get(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let embryo_id = call.param(0);
    call.read(|r| {
        let embryo = r
            .embryo(embryo_id)?
            .ok_or_else(|| not_found(format!("embryo {embryo_id}")))?;
        Ok(tagged(embryo_json(&embryo), embryo.version))
    })
}

fn embryo_fate(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let embryo_id = call.param(0).to_string();
    let body: FateBody = json_body(call.request)?;
    let fate = Fate::from_name(&body.fate).ok_or_else(|| {
        refuse(
            422,
            "invalid_input",
            format!(
                "fate {:?} is not one of undecided, transfer, freeze, avoid",
                body.fate
            ),
        )
    })?;
    let expected_version = if_match(call.request)?;
    let edit = ClinicalEdit::SetFate {
        embryo_id: embryo_id.clone(),
        expected_version,
        fate,
    };
    call.submit(edit, Render::Embryo { embryo_id })
}

fn embryo_score(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let (embryo_id, model) = (call.param(0).to_string(), call.param(1).to_string());
    let body: ScoreBody = json_body(call.request)?;
    let expected_version = if_match(call.request)?;
    let edit = ClinicalEdit::SetScore {
        embryo_id: embryo_id.clone(),
        expected_version,
        score: ScoreInput {
            model,
            model_version: body.model_version,
            value: body.value,
            viability: body.viability,
        },
    };
    call.submit(edit, Render::Embryo { embryo_id })
}

fn evaluations_list(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let embryo_id = call.param(0);
    call.read(|r| {
        let results = r
            .model_results(embryo_id)?
            .ok_or_else(|| not_found(format!("embryo {embryo_id}")))?;
        let items: Vec<Value> = results.iter().map(evaluation_json).collect();
        Ok(Response::json(200, &json!({ "items": items })))
    })
}

fn evaluation_post(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let embryo_id = call.param(0).to_string();
    let body: EvaluationBody = json_body(call.request)?;
    if body.model.is_empty() || body.model.len() > 128 || body.model.chars().any(char::is_control) {
        return Err(refuse(
            422,
            "invalid_field",
            "model must be 1 to 128 bytes without control characters".to_string(),
        ));
    }
    if body.version == Some(0) {
        return Err(refuse(
            422,
            "invalid_field",
            "version counts from 1; leave it out for the newest".to_string(),
        ));
    }
    let expected_version = if_match(call.request)?;
    let edit = ClinicalEdit::Evaluate {
        embryo_id: embryo_id.clone(),
        expected_version,
        model: body.model,
        version: body.version,
    };
    call.submit(edit, Render::Embryo { embryo_id })
}

/// The embryo's curve as the viewer protocol and the API serve it
/// ([`crate::activity::curve`]).
fn served_curve(
    call: &Call<'_>,
    embryo_id: &str,
) -> Result<crate::activity::EmbryoActivity, Refusal> {
    let background = call.shared.settings.activity_background;
    match crate::activity::curve(&call.shared.store, embryo_id, background) {
        Ok(Some(curve)) => Ok(curve),
        Ok(None) => Err(refuse(
            404,
            "not_found",
            format!("embryo {embryo_id} is unknown"),
        )),
        Err(crate::activity::CurveError::Busy) => Err(Box::new(Response::busy())),
        Err(crate::activity::CurveError::Storage(error)) => Err(storage_refusal(error)),
    }
}

fn activity_get(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let embryo_id = call.param(0).to_string();
    let curve = served_curve(call, &embryo_id)?;
    let points: Vec<Value> = curve
        .points
        .iter()
        .map(|p| {
            json!({
                "acquired_at": iso_utc(p.acquired_at_ms),
                "acquired_at_ms": p.acquired_at_ms,
                "activity": p.activity,
            })
        })
        .collect();
    Ok(Step::Respond(Response::json(
        200,
        &json!({
            "focal_plane": curve.focal_plane,
            "points": points,
            "proposed": curve.proposed,
            "frames_skipped": curve.frames_skipped,
            "analysed_through_ms": curve.through_ms,
            "source": if curve.stored { "background" } else { "computed_now" },
            "pending": curve.pending,
        }),
    )))
}

/// The curve drawn as an SVG image, with the proposed cleavage times marked.
fn activity_plot(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let embryo_id = call.param(0).to_string();
    let curve = served_curve(call, &embryo_id)?;
    let insemination_at_ms = call
        .shared
        .store
        .read()
        .and_then(|r| r.embryo(&embryo_id))
        .map_err(storage_refusal)?
        .map_or(0, |e| e.insemination_at_ms);
    let title = format!("Blastomere activity of embryo {embryo_id}");
    let svg = es_models::activity::svg(&curve.points, insemination_at_ms, &curve.proposed, &title);
    let mut response = Response::json(200, &Value::Null);
    response.headers = vec![("content-type", "image/svg+xml".into())];
    response.body = bytes::Bytes::from(svg);
    Ok(Step::Respond(response))
}

/// Accepts a proposed cleavage time as the embryo's annotation (source `computed`), unless the
/// embryo has that annotation already: a person's annotation is never replaced.
fn proposal_accept(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let embryo_id = call.param(0).to_string();
    let event = call.param(1);
    let Some(index) = ["t2", "t3", "t4", "t5"].iter().position(|e| *e == event) else {
        return Err(refuse(
            422,
            "invalid_parameter",
            format!("proposals are for t2, t3, t4 and t5, not {event:?}"),
        ));
    };
    let event = event.to_string();
    let expected_version = if_match(call.request)?;
    // Rights first (audited), before the curve is computed.
    let principal = call.principal();
    let editor = Editor {
        actor: principal.actor(call.peer),
        grant: principal.grant,
    };
    let attempt = ClinicalEdit::AddAnnotation {
        embryo_id: embryo_id.clone(),
        expected_version,
        annotation: es_storage::AnnotationInput {
            name: event.clone(),
            value: String::new(),
            event_at_ms: None,
            source: es_storage::AnnotationSource::Computed,
        },
    };
    edits::authorize(&call.shared.writer, &editor, &attempt).map_err(edit_refused)?;
    let store = &call.shared.store;
    let embryo = store
        .read()
        .and_then(|r| r.embryo(&embryo_id))
        .map_err(storage_refusal)?
        .ok_or_else(|| refuse(404, "not_found", format!("embryo {embryo_id} is unknown")))?;
    if let Some(existing) = embryo
        .annotations
        .iter()
        .find(|a| a.name.eq_ignore_ascii_case(&event))
    {
        return Err(refuse(
            409,
            "already_annotated",
            format!(
                "embryo {embryo_id} has {event} already (set by {}): correct that annotation \
                 instead",
                existing.set_by
            ),
        ));
    }
    let curve = served_curve(call, &embryo_id)?;
    let Some(&at_ms) = curve.proposed_at_ms.get(index) else {
        return Err(refuse(
            422,
            "no_proposal",
            format!("the activity curve of embryo {embryo_id} proposes no {event}"),
        ));
    };
    let edit = ClinicalEdit::AddAnnotation {
        embryo_id: embryo_id.clone(),
        expected_version,
        annotation: es_storage::AnnotationInput {
            name: event,
            value: String::new(),
            event_at_ms: Some(at_ms),
            source: es_storage::AnnotationSource::Computed,
        },
    };
    call.submit(edit, Render::Embryo { embryo_id })
}

fn models_list(call: &mut Call<'_>) -> Result<Step, Refusal> {
    call.read(|r| {
        let items: Vec<Value> = r.models()?.iter().map(model_summary_json).collect();
        Ok(Response::json(200, &json!({ "items": items })))
    })
}

fn model_post(call: &mut Call<'_>) -> Result<Step, Refusal> {
    // The body is the model document itself (docs/models.md).
    let _: Value = json_body(call.request)?;
    let document = std::str::from_utf8(&call.request.body)
        .map_err(|_| refuse(400, "invalid_json", "the document is not UTF-8"))?
        .to_string();
    if let Err(error) = es_models::Model::from_json(document.as_bytes()) {
        return Err(refuse(422, error.code(), error.to_string()));
    }
    let principal = call.principal();
    let editor = Editor {
        actor: principal.actor(call.peer),
        grant: principal.grant,
    };
    let result = edits::import_model(&call.shared.writer, &call.shared.disk, &editor, document)
        .map_err(edit_refused)?;
    match result {
        Ok(done) => {
            let location = format!("/api/v1/models/{}", path_part(&done.name));
            let body =
                json!({ "name": done.name, "version": done.version, "created": done.created });
            let status = if done.created { 201 } else { 200 };
            Ok(Step::Respond(
                Response::json(status, &body).with_header("location", location),
            ))
        }
        Err(error) => Ok(Step::Respond(write_error(&error, |never| match *never {}))),
    }
}

fn model_get(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let name = call.param(0);
    let version = match call.request.query_param("version") {
        None | Some("") => None,
        Some(text) => Some(number_param::<u32>("version", text)?),
    };
    call.read(|r| {
        let model = r
            .model(name, version)?
            .ok_or_else(|| not_found(format!("model {name}")))?;
        let mut value = model_summary_json(&model);
        value["document"] = serde_json::from_str(&model.document).unwrap_or(Value::Null);
        Ok(Response::json(200, &value))
    })
}

fn model_summary_json(m: &es_storage::ModelRecord) -> Value {
    json!({
        "name": m.name,
        "version": m.version,
        "kind": m.kind,
        "used": m.used,
        "imported_by": m.imported_by,
        "imported_at": iso_utc(m.imported_at_ms),
    })
}

fn evaluation_json(r: &es_storage::ModelResultRecord) -> Value {
    json!({
        "model": r.model,
        "version": r.version,
        "outcome": r.outcome,
        "value": r.value,
        "rule": r.rule,
        "variables": r.variables,
        "set_by": r.set_by,
        "set_at": iso_utc(r.set_at_ms),
    })
}

fn acquisitions_list(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let (embryo_id, request) = (call.param(0), call.request);
    call.read(|r| {
        let limit = page_limit(request)?;
        let after = match request.query_param("after") {
            None | Some("") => None,
            Some(text) => Some(number_param("after", text)?),
        };
        let acquisitions = r
            .acquisitions(embryo_id, after, limit)?
            .ok_or_else(|| not_found(format!("embryo {embryo_id}")))?;
        let next = (acquisitions.len() == limit as usize)
            .then(|| acquisitions.last().map(|a| a.acquired_at_ms))
            .flatten();
        let items: Vec<Value> = acquisitions
            .iter()
            .map(|a| {
                json!({
                    "acquired_at": iso_utc(a.acquired_at_ms),
                    "acquired_at_ms": a.acquired_at_ms,
                    "focal_planes": a.focal_planes,
                })
            })
            .collect();
        Ok(Response::json(
            200,
            &json!({ "items": items, "next_after": next.map(|n| n.to_string()) }),
        ))
    })
}

fn image_get(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let embryo_id = call.param(0);
    let acquired_at_ms = number_param("acquisition", call.param(1))?;
    let focal_plane = focal_plane_param(call.request.query_param("focal_plane"))?;
    call.read(|r| {
        let jpeg = r
            .embryo_image(embryo_id, acquired_at_ms, focal_plane)?
            .ok_or_else(|| {
                not_found(format!(
                    "no image of embryo {embryo_id} at {acquired_at_ms} ms, focal plane {focal_plane}"
                ))
            })?;
        Ok(jpeg_response(jpeg))
    })
}

fn timelapse_get(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let embryo_id = call.param(0);
    let focal_plane = focal_plane_param(call.request.query_param("focal_plane"))?;
    Ok(Step::Zip(ZipPlan {
        embryo_id: embryo_id.to_string(),
        focal_plane,
        name_prefix: file_name_part(embryo_id),
    }))
}

fn changes_get(call: &mut Call<'_>) -> Result<Step, Refusal> {
    let request = call.request;
    let after = match request.query_param("after") {
        None => 0,
        Some(text) => number_param("after", text)?,
    };
    let limit = page_limit(request)?;
    let wait = match request.query_param("wait") {
        None => 0,
        Some(text) => number_param::<u64>("wait", text)?,
    };
    if wait > CHANGES_WAIT_MAX.as_secs() {
        return Err(refuse(
            400,
            "invalid_parameter",
            format!("wait is at most {} seconds", CHANGES_WAIT_MAX.as_secs()),
        ));
    }
    let reader = call.shared.store.read().map_err(storage_refusal)?;
    let changes = reader.changes_after(after, limit).map_err(change_refusal)?;
    if changes.is_empty() && wait > 0 {
        return Ok(Step::Wait {
            after,
            limit,
            until: Instant::now() + Duration::from_secs(wait),
        });
    }
    let last = reader.last_change_seq().map_err(storage_refusal)?;
    Ok(Step::Respond(changes_response(&changes, after, last)))
}

// ---------------------------------------------------------------- authentication

/// Without a valid licence no client is served (incubators keep uploading; the web
/// interface stays up to install one).
pub(super) fn license_refusal<S>(shared: &ApiShared<S>) -> Option<String> {
    shared.licensing.current(now_ms()).err().map(|error| {
        format!("licence invalid: {error}; an administrator must install a valid licence")
    })
}

fn authenticate(shared: &ApiShared, request: &Request) -> Result<Principal, Refusal> {
    if let Some(message) = license_refusal(shared) {
        return Err(refuse(403, "license_invalid", message));
    }
    match auth::authenticate(&shared.store, &shared.tokens, request, Instant::now()) {
        Ok(principal) => Ok(principal),
        Err(Refused::Missing) => Err(refuse(
            401,
            "auth_required",
            "send an API key or a login token: Authorization: Bearer <key or token>",
        )),
        Err(Refused::Invalid) => Err(refuse(
            401,
            "auth_failed",
            "the API key or token is unknown, revoked or expired; log in again",
        )),
        Err(Refused::Unavailable(detail)) => Err(refuse(503, "storage_unavailable", detail)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
}

/// Checks a password on this worker, then has the storage writer record the attempt (and
/// lock the account after too many failures); the session issues the token.
pub(crate) fn start_login<S>(
    shared: &ApiShared<S>,
    user: &str,
    password: &str,
    kind: LoginKind,
    peer: SocketAddr,
    handle: &ConnHandle<ApiMsg>,
) -> Result<Step, Refusal> {
    // The web interface stays usable without a licence, to install one.
    if kind != LoginKind::Web {
        if let Some(message) = license_refusal(shared) {
            let status = if kind == LoginKind::Legacy { 503 } else { 403 };
            return Err(refuse(status, "license_invalid", message));
        }
    }
    if es_storage::user_name(user).is_err()
        || password.is_empty()
        || password.len() > crate::accounts::PASSWORD_BYTES_MAX
    {
        return Err(refuse(401, "auth_failed", "wrong user name or password"));
    }
    let computer = match kind {
        LoginKind::Web => format!("web {}", peer.ip()),
        LoginKind::View => format!("browser {}", peer.ip()),
        LoginKind::Rest | LoginKind::Legacy => format!("api {}", peer.ip()),
    };
    let address = peer.ip().to_string();
    let (user, check) = check_password(&shared.store, user, password, &address);
    let user = user.as_str();
    let (success, rights) = match check {
        LoginCheck::Correct { rights } => (true, rights),
        LoginCheck::Wrong | LoginCheck::Disabled | LoginCheck::Locked { .. } => {
            (false, es_storage::Rights::View)
        }
        LoginCheck::UnknownUser => {
            tracing::warn!(%user, peer = %peer, code = "auth_failed", "public API login refused: unknown user");
            crate::accounts::audit_unknown_user(&shared.writer, user, &computer);
            return Err(refuse(401, "auth_failed", crate::accounts::LOGIN_REFUSED));
        }
        LoginCheck::Unavailable(detail) => {
            return Err(refuse(
                503,
                "storage_unavailable",
                format!("cannot check the login: {detail}"),
            ))
        }
    };
    let op = LoginAttempt {
        name: user.to_string(),
        computer,
        address,
        success,
        failures_max: shared.settings.login_failures_max,
        lockout_ms: shared.settings.lockout_ms,
        at_ms: now_ms(),
    };
    let reply = handle.clone();
    let user = user.to_string();
    let done = move |result| {
        reply.send(ApiMsg::LoginRecorded {
            user,
            rights,
            kind,
            result,
        });
    };
    match shared.writer.try_submit(op, done) {
        Ok(()) => Ok(Step::Submitted),
        Err(SubmitError::Full(..)) => Err(Box::new(Response::busy())),
        Err(SubmitError::Closed(..)) => {
            Err(refuse(503, "shutting_down", "the server is shutting down"))
        }
    }
}

pub(super) fn token_response(token: &str, legacy: bool) -> Response {
    if legacy {
        return Response::json(200, &json!({ "Token": token }));
    }
    Response::json(
        200,
        &json!({
            "token": token,
            "idle_timeout_seconds": auth::TOKEN_IDLE.as_secs(),
            "lifetime_seconds": auth::TOKEN_LIFETIME.as_secs(),
        }),
    )
}

// ---------------------------------------------------------------- writes

/// Hands a clinical edit to the one edit path ([`crate::edits`]); the completion answers
/// through the session.
fn submit(
    shared: &ApiShared,
    request: &Request,
    principal: &Principal,
    peer: SocketAddr,
    edit: ClinicalEdit,
    render: Render,
    handle: &ConnHandle<ApiMsg>,
) -> Result<Step, Refusal> {
    let editor = Editor {
        actor: principal.actor(peer),
        grant: principal.grant,
    };
    // Rights first (audited), then the request's own Idempotency-Key.
    edits::authorize(&shared.writer, &editor, &edit).map_err(edit_refused)?;
    let idempotency = match request.header("idempotency-key") {
        None => None,
        Some(key) => {
            if key.is_empty()
                || key.len() > IDEMPOTENCY_KEY_BYTES_MAX
                || !key.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(refuse(
                    400,
                    "invalid_idempotency_key",
                    format!(
                        "an Idempotency-Key has 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII characters"
                    ),
                ));
            }
            let mut hasher = Sha256::new();
            hasher.update(request.method.as_bytes());
            hasher.update(b" ");
            hasher.update(request.path.as_bytes());
            hasher.update(b"\n");
            hasher.update(request.header("if-match").unwrap_or("").as_bytes());
            hasher.update(b"\n");
            hasher.update(&request.body);
            Some(Idempotency {
                principal: principal.id.clone(),
                key: key.to_string(),
                request_sha256: hasher.finalize().into(),
            })
        }
    };
    let reply = handle.clone();
    let done = move |result| {
        reply.send(ApiMsg::Written { result, render });
    };
    edits::submit(
        &shared.writer,
        &shared.disk,
        &editor,
        edit,
        idempotency,
        crate::now_ms(),
        done,
    )
    .map_err(edit_refused)?;
    Ok(Step::Submitted)
}

/// An edit the edit path refused, as the REST API answers it.
fn edit_refused(refused: edits::Refused) -> Refusal {
    match refused {
        edits::Refused::Forbidden(message) => refuse(403, "forbidden", message),
        edits::Refused::Busy => Box::new(Response::busy()),
        edits::Refused::DiskLow => refuse(
            503,
            "disk_full",
            "the server's disk is nearly full; writes are refused until space is freed",
        ),
        edits::Refused::ShuttingDown => refuse(503, "shutting_down", "the server is shutting down"),
    }
}

/// The answer to a durable or refused write: the resource as it is now. A stale version
/// gets 412 with the current state and its ETag, so the client can merge and retry.
pub(super) fn render_written<S>(
    shared: &ApiShared<S>,
    result: OpResult<Edit>,
    render: &Render,
) -> Response {
    let reader = match shared.store.read() {
        Ok(reader) => reader,
        Err(error) => return Response::storage(&error),
    };
    let (outcome, stale) = match result {
        Ok(outcome) => (Some(outcome), None),
        Err(WriteError::Refused(EditRefusal::Stale(stale))) => {
            (None, Some((stale.expected, stale.version)))
        }
        Err(error) => return write_error(&error, edit_refusal_status),
    };
    let replayed = outcome.as_ref().is_some_and(|edited| edited.replayed);
    let current = match current_state(&reader, render, outcome.as_ref()) {
        Ok(Some(found)) => found,
        Ok(None) => return Response::error(404, "not_found", "the resource no longer exists"),
        Err(error) => return Response::storage(&error),
    };
    let (value, version, location) = current;
    if let Some((expected, version)) = stale {
        let message = format!(
            "the resource is at version {version}, not {expected}: someone changed it meanwhile; \
             merge with the current state and send it again with If-Match: \"{version}\""
        );
        let body = json!({ "code": "precondition_failed", "message": message, "current": value });
        return Response::json(412, &body).with_header("etag", etag(version));
    }
    let created = matches!(
        render,
        Render::Patient { created: true, .. } | Render::Transfer { created: true }
    );
    let mut response =
        Response::json(if created { 201 } else { 200 }, &value).with_header("etag", etag(version));
    if created {
        response = response.with_header("location", location);
    }
    if replayed {
        response = response.with_header("idempotent-replayed", "true");
    }
    response
}

type Current = (Value, u64, String);

fn current_state(
    reader: &Reader,
    render: &Render,
    outcome: Option<&Edited>,
) -> Result<Option<Current>, StorageError> {
    Ok(match render {
        Render::Patient { patient_id, .. } => reader.patient(patient_id)?.map(|p| {
            let location = format!("/api/v1/patients/{}", path_part(&p.patient_id));
            (patient_json(&p), p.version, location)
        }),
        Render::Treatment { patient_id, name } => reader.treatment(patient_id, name)?.map(|t| {
            let location = format!(
                "/api/v1/patients/{}/treatments/{}",
                path_part(patient_id),
                path_part(name)
            );
            (treatment_json(&t), t.version, location)
        }),
        Render::Embryo { embryo_id } => reader.embryo(embryo_id)?.map(|e| {
            let location = format!("/api/v1/embryos/{}", path_part(embryo_id));
            (embryo_json(&e), e.version, location)
        }),
        Render::Transfer { .. } => {
            let Some(edited) = outcome else {
                return Ok(None);
            };
            reader.transfer(edited.key)?.map(|t| {
                let location = format!("/api/v1/transfers/{}", t.transfer_key);
                (transfer_json(&t), t.version, location)
            })
        }
    })
}

/// A refused write as a response; `refusal_status` gives the operation's own refusals their
/// status and message.
pub(super) fn write_error<R: es_storage::Refusal>(
    error: &WriteError<R>,
    refusal_status: impl FnOnce(&R) -> (u16, String),
) -> Response {
    let (status, message) = match error {
        WriteError::Refused(refusal) => refusal_status(refusal),
        WriteError::InvalidInput(message) => (422, message.clone()),
        WriteError::DiskFull | WriteError::ShuttingDown | WriteError::Storage(_) => {
            (503, error.to_string())
        }
    };
    Response::error(status, error.code(), message)
}

pub(super) fn edit_refusal_status(refusal: &EditRefusal) -> (u16, String) {
    match refusal {
        EditRefusal::NotFound(what) => (404, format!("{what} is unknown")),
        EditRefusal::AlreadyExists(what) => (409, format!("{what} already exists")),
        EditRefusal::IdempotencyKeyReused(_) => (422, refusal.to_string()),
        EditRefusal::Stale(_) => (412, refusal.to_string()),
    }
}

pub(super) fn admin_refusal_status(refusal: &AdminRefusal) -> (u16, String) {
    match refusal {
        AdminRefusal::NotFound(what) => (404, format!("{what} is unknown")),
        AdminRefusal::AlreadyExists(what) => (409, format!("{what} already exists")),
    }
}

/// The version a write expects, from `If-Match: "N"`. Required: a write that does not say
/// which version it saw could overwrite a change it never saw.
fn if_match(request: &Request) -> Result<u64, Refusal> {
    let Some(value) = request.header("if-match") else {
        return Err(refuse(
            428,
            "precondition_required",
            "send If-Match with the ETag you read (for example If-Match: \"3\")",
        ));
    };
    let value = value.trim();
    let value = value.strip_prefix("W/").unwrap_or(value);
    let unquoted = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if !unquoted.is_empty() && unquoted.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(version) = unquoted.parse::<u64>() {
            return Ok(version);
        }
    }
    Err(refuse(
        400,
        "invalid_if_match",
        "If-Match must be one ETag this server gave, such as \"3\"",
    ))
}

fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

fn tagged(value: Value, version: u64) -> Response {
    Response::json(200, &value).with_header("etag", etag(version))
}

// ---------------------------------------------------------------- bodies

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatientBody {
    patient_id: String,
    first_name: String,
    last_name: String,
    date_of_birth: String,
    /// The original system's PatientIDx, for a patient that comes with one; minted when
    /// absent.
    #[serde(default)]
    patient_idx: String,
}

impl PatientBody {
    fn into_ref(self) -> PatientRef {
        PatientRef {
            patient_idx: self.patient_idx,
            patient_id: self.patient_id,
            first_name: self.first_name,
            last_name: self.last_name,
            date_of_birth: self.date_of_birth,
        }
    }
}

fn patient_id_of(edit: &ClinicalEdit) -> String {
    match edit {
        ClinicalEdit::CreatePatient { patient } => patient.patient_id.clone(),
        _ => String::new(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatientUpdateBody {
    first_name: String,
    last_name: String,
    date_of_birth: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TreatmentBody {
    comment: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    transferred_at: String,
    embryo_ids: Vec<String>,
    #[serde(default)]
    comment: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeBody {
    gestational_sacs: Option<u32>,
    fetal_heartbeats: Option<u32>,
    clinical_pregnancy: Option<bool>,
    live_birth: Option<bool>,
    #[serde(default)]
    comment: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FateBody {
    fate: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvaluationBody {
    model: String,
    #[serde(default)]
    version: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreBody {
    value: String,
    #[serde(default)]
    model_version: String,
    #[serde(default)]
    viability: String,
}

fn json_body<T: serde::de::DeserializeOwned>(request: &Request) -> Result<T, Refusal> {
    if let Some(kind) = request.header("content-type") {
        let media = kind.split(';').next().unwrap_or("").trim();
        if !media.eq_ignore_ascii_case("application/json") {
            return Err(refuse(
                415,
                "unsupported_media_type",
                format!("send the body as application/json, not {media}"),
            ));
        }
    }
    serde_json::from_slice(&request.body).map_err(|error| {
        refuse(
            400,
            "invalid_json",
            format!("the body is not the JSON this call takes: {error}"),
        )
    })
}

fn instant_field(name: &str, text: &str) -> Result<i64, Refusal> {
    parse_iso_utc(text).ok_or_else(|| {
        refuse(
            422,
            "invalid_input",
            format!("{name} must be a UTC instant such as 2024-06-11T10:00:00Z, not {text:?}"),
        )
    })
}

// ---------------------------------------------------------------- reads

fn read_step(
    shared: &ApiShared,
    read: impl FnOnce(&Reader) -> Result<Response, ReadFailure>,
) -> Result<Step, Refusal> {
    let reader = shared.store.read().map_err(storage_refusal)?;
    match read(&reader) {
        Ok(response) => Ok(Step::Respond(response)),
        Err(ReadFailure::Storage(error)) => Err(Box::new(Response::storage(&error))),
        Err(ReadFailure::Refused(response)) => Err(response),
    }
}

/// Why a read did not produce its resource.
enum ReadFailure {
    Storage(StorageError),
    Refused(Refusal),
}

impl From<StorageError> for ReadFailure {
    fn from(error: StorageError) -> Self {
        ReadFailure::Storage(error)
    }
}

impl From<Refusal> for ReadFailure {
    fn from(response: Refusal) -> Self {
        ReadFailure::Refused(response)
    }
}

fn not_found(what: String) -> ReadFailure {
    ReadFailure::Refused(refuse(404, "not_found", format!("{what} is unknown")))
}

fn storage_refusal(error: StorageError) -> Refusal {
    Box::new(Response::storage(&error))
}

fn change_refusal(error: StorageError) -> Refusal {
    match error {
        StorageError::CursorExpired { oldest } => refuse(
            410,
            "cursor_expired",
            format!(
                "changes before {oldest} are no longer kept (or the cursor is from another \
                 server): read everything again, then follow the feed from the newest seq"
            ),
        ),
        other => storage_refusal(other),
    }
}

/// Answers a change-feed poll now (after a wait ended).
pub(crate) fn changes_now<S>(shared: &ApiShared<S>, after: u64, limit: u32) -> Response {
    let reader = match shared.store.read() {
        Ok(reader) => reader,
        Err(error) => return Response::storage(&error),
    };
    let changes = match reader.changes_after(after, limit) {
        Ok(changes) => changes,
        Err(error) => return *change_refusal(error),
    };
    match reader.last_change_seq() {
        Ok(last) => changes_response(&changes, after, last),
        Err(error) => Response::storage(&error),
    }
}

fn changes_response(changes: &[Change], after: u64, last: u64) -> Response {
    let next = changes.last().map_or(after, |c| c.seq);
    let items: Vec<Value> = changes
        .iter()
        .map(|c| {
            json!({
                "seq": c.seq,
                "entity": c.entity.as_str(),
                "id": c.id,
                "version": c.version,
                "at": iso_utc(c.at_ms),
                "summary": c.summary,
            })
        })
        .collect();
    Response::json(
        200,
        &json!({ "items": items, "next_after": next, "last_seq": last }),
    )
    // A feed's answer is for the moment it was read.
    .with_header("cache-control", "no-store")
}

fn page_limit(request: &Request) -> Result<u32, Refusal> {
    match request.query_param("limit") {
        None => Ok(PAGE_DEFAULT),
        Some(text) => {
            let limit: u32 = number_param("limit", text)?;
            if (1..=PAGE_MAX).contains(&limit) {
                Ok(limit)
            } else {
                Err(refuse(
                    400,
                    "invalid_parameter",
                    format!("limit is 1 to {PAGE_MAX}"),
                ))
            }
        }
    }
}

fn number_param<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, Refusal> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse(
            400,
            "invalid_parameter",
            format!("{name} must be a whole number, not {text:?}"),
        ));
    }
    text.parse().map_err(|_| {
        refuse(
            400,
            "invalid_parameter",
            format!("{name} {text:?} is out of range"),
        )
    })
}

fn number_segment(name: &str, text: &str) -> Result<u64, Refusal> {
    number_param(name, text).map_err(|_| refuse(404, "not_found", format!("no {name} {text:?}")))
}

pub(super) fn focal_plane_param(text: Option<&str>) -> Result<i32, Refusal> {
    match text {
        None | Some("") => Ok(0),
        Some(text) => number_param("focal plane", text),
    }
}

/// A page of an in-memory list, by position: `after` is the index of the last item seen.
fn page_by_index<'a, T>(
    request: &Request,
    items: &'a [T],
) -> Result<(&'a [T], Option<String>), Refusal> {
    let limit = page_limit(request)? as usize;
    let start = match request.query_param("after") {
        None | Some("") => 0,
        Some(text) => number_param::<usize>("after", text)?.min(items.len()),
    };
    let end = (start + limit).min(items.len());
    let next = (end < items.len()).then(|| end.to_string());
    Ok((&items[start..end], next))
}

fn list_patients(reader: &Reader, request: &Request) -> Result<Response, ReadFailure> {
    let limit = page_limit(request)?;
    let after = request.query_param("after").filter(|a| !a.is_empty());
    let patients = reader.patients(after, limit)?;
    let next = (patients.len() == limit as usize)
        .then(|| patients.last().map(|p| p.patient_id.clone()))
        .flatten();
    let items: Vec<Value> = patients.iter().map(patient_json).collect();
    Ok(Response::json(
        200,
        &json!({ "items": items, "next_after": next }),
    ))
}

/// The embryos of a treatment, by dish and well; None if the treatment is unknown.
pub(super) fn treatment_embryos(
    reader: &Reader,
    patient_id: &str,
    name: &str,
) -> Result<Option<Vec<EmbryoRecord>>, StorageError> {
    let Some(dishes) = reader.treatment_dishes(patient_id, name)? else {
        return Ok(None);
    };
    let mut embryos = Vec::new();
    for dish in &dishes {
        for (_, embryo_id) in &dish.wells {
            if let Some(embryo) = reader.embryo(embryo_id)? {
                embryos.push(embryo);
            }
        }
    }
    Ok(Some(embryos))
}

pub(super) fn jpeg_response(jpeg: bytes::Bytes) -> Response {
    Response {
        status: 200,
        headers: vec![
            ("content-type", "image/jpeg".into()),
            // A stored image never changes (a different one under its key is refused).
            (
                "cache-control",
                "private, max-age=31536000, immutable".into(),
            ),
        ],
        body: jpeg,
    }
}

/// An identifier as part of a file name: path separators and controls replaced.
pub(super) fn file_name_part(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// True when `id` can name a resource in a path: the HTTP layer refuses control characters
/// in paths, and clients resolve the segments `.` and `..` before sending.
fn usable_in_path(id: &str) -> bool {
    id != "." && id != ".." && !id.chars().any(|c| c.is_ascii_control())
}

/// An identifier as one path segment (percent-encoding what is not unreserved).
fn path_part(id: &str) -> String {
    let mut out = String::new();
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------- JSON shapes

fn patient_json(p: &PatientRecord) -> Value {
    let differs = p.details_differ.as_ref().map(|d| {
        json!({
            "instrument_serial": d.instrument_serial,
            "dish_id": d.dish_id,
            "first_name": d.first_name,
            "last_name": d.last_name,
            "date_of_birth": d.date_of_birth,
            "at": iso_utc(d.at_ms),
            "times": d.times,
        })
    });
    json!({
        "patient_id": p.patient_id,
        "patient_idx": p.patient_idx,
        "details_differ": differs,
        "first_name": p.first_name,
        "last_name": p.last_name,
        "date_of_birth": p.date_of_birth,
        "version": p.version,
        "created_at": iso_utc(p.created_at_ms),
        "updated_at": iso_utc(p.updated_at_ms),
        "treatments": p.treatments.iter().map(treatment_json).collect::<Vec<_>>(),
    })
}

fn treatment_json(t: &TreatmentRecord) -> Value {
    json!({
        "patient_id": t.patient_id,
        "name": t.name,
        "comment": t.comment,
        "version": t.version,
        "created_at": iso_utc(t.created_at_ms),
        "updated_at": iso_utc(t.updated_at_ms),
    })
}

fn dish_json(d: &DishRecord) -> Value {
    json!({
        "dish_id": d.dish_id,
        "instrument_serial": d.instrument_serial,
        "instrument_number": d.instrument_number,
        "slot": d.slot,
        "insemination_at": iso_utc(d.insemination_at_ms),
        "fertilization_method": d.fertilization_method,
        "wells": d.wells.iter().map(|(well, embryo_id)| json!({ "well": well, "embryo_id": embryo_id })).collect::<Vec<_>>(),
    })
}

fn annotation_json(a: &AnnotationRecord) -> Value {
    json!({
        "annotation_id": a.annotation_id,
        "name": a.name,
        "value": a.value,
        "event_at": a.event_at_ms.map(iso_utc),
        "hours": a.hours,
        "source": a.source.as_str(),
        "set_by": a.set_by,
        "set_at": iso_utc(a.set_at_ms),
    })
}

/// The embryo as the models see it (`es_models`): the latest of each timing annotation
/// (names matched without regard to case) in hours after insemination, and the latest value of
/// each other annotation.
pub fn model_inputs(annotations: &[AnnotationRecord]) -> es_models::Embryo {
    let mut ordered: Vec<&AnnotationRecord> = annotations.iter().collect();
    ordered.sort_by_key(|a| (a.set_at_ms, a.annotation_id));
    let mut embryo = es_models::Embryo::default();
    for annotation in ordered {
        embryo.add_annotation(&annotation.name, &annotation.value, annotation.hours);
    }
    embryo
}

/// The derived morphokinetic variables (`es_models::DERIVED`, docs/models.md) that are
/// available, in hours; `tB-tSB` repeats `dB` under the name earlier versions used.
pub(super) fn derived_variables(annotations: &[AnnotationRecord]) -> Vec<(&'static str, f64)> {
    let embryo = model_inputs(annotations);
    let mut out: Vec<(&'static str, f64)> = es_models::DERIVED
        .iter()
        .filter_map(|(name, _, _)| embryo.variable(name).hours().map(|hours| (*name, hours)))
        .collect();
    if let Some(&(_, hours)) = out.iter().find(|(name, _)| *name == "dB") {
        out.push(("tB-tSB", hours));
    }
    out
}

pub(crate) fn embryo_json(e: &EmbryoRecord) -> Value {
    let derived: serde_json::Map<String, Value> = derived_variables(&e.annotations)
        .into_iter()
        .map(|(name, value)| (name.to_string(), json!(value)))
        .collect();
    json!({
        "embryo_id": e.embryo_id,
        "patient_id": e.patient_id,
        "treatment": e.treatment_name,
        "dish_id": e.dish_id,
        "well": e.well,
        "instrument_serial": e.instrument_serial,
        "instrument_number": e.instrument_number,
        "label": e.label,
        "fertilization_method": e.fertilization_method,
        "insemination_at": iso_utc(e.insemination_at_ms),
        "fate": e.fate.as_str(),
        "comment": e.comment,
        "version": e.version,
        "updated_at": iso_utc(e.updated_at_ms),
        "annotations": e.annotations.iter().map(annotation_json).collect::<Vec<_>>(),
        "derived": derived,
        "scores": e.scores.iter().map(|s| json!({
            "model": s.model,
            "model_version": s.model_version,
            "value": s.value,
            "viability": s.viability,
            "set_by": s.set_by,
            "set_at": iso_utc(s.set_at_ms),
        })).collect::<Vec<_>>(),
    })
}

fn transfer_json(t: &TransferRecord) -> Value {
    json!({
        "transfer_id": t.transfer_key,
        "patient_id": t.patient_id,
        "treatment": t.treatment_name,
        "transferred_at": iso_utc(t.transferred_at_ms),
        "embryo_ids": t.embryo_ids,
        "outcome": {
            "gestational_sacs": t.outcome.gestational_sacs,
            "fetal_heartbeats": t.outcome.fetal_heartbeats,
            "clinical_pregnancy": t.outcome.clinical_pregnancy,
            "live_birth": t.outcome.live_birth,
        },
        "comment": t.comment,
        "version": t.version,
        "created_at": iso_utc(t.created_at_ms),
        "updated_at": iso_utc(t.updated_at_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_storage::AnnotationSource;

    fn annotation(name: &str, hours: f64) -> AnnotationRecord {
        AnnotationRecord {
            annotation_id: 1,
            name: name.into(),
            value: String::new(),
            event_at_ms: Some(0),
            hours: Some(hours),
            source: AnnotationSource::Manual,
            set_by: "anna".into(),
            set_at_ms: 0,
        }
    }

    /// The route table and the served OpenAPI document name the same resources and methods.
    #[test]
    fn the_route_table_is_the_openapi_documents_paths() {
        let document: Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        let mut documented = std::collections::BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if method != "parameters" {
                    documented.insert((path.clone(), method.to_uppercase()));
                }
            }
        }
        let mut table = std::collections::BTreeSet::new();
        for route in ROUTES {
            for (method, _) in route.methods {
                table.insert((format!("/{}", route.path), method.names()[0].to_string()));
            }
        }
        assert_eq!(table, documented);
        assert_eq!(
            document["servers"][0]["url"]
                .as_str()
                .map(|url| url.ends_with("/api/v1")),
            Some(true),
            "the table's paths are under /api/v1"
        );
    }

    #[test]
    fn routes_match_whole_paths_and_405_lists_what_a_resource_answers() {
        fn find(at: &[&'static str]) -> Option<(&'static str, Vec<&'static str>)> {
            ROUTES
                .iter()
                .find_map(|route| route.matches(at).map(|params| (route.path, params)))
        }
        assert_eq!(
            find(&["patients", "P1", "treatments", "T 1"]),
            Some((
                "patients/{patient_id}/treatments/{treatment_name}",
                vec!["P1", "T 1"]
            ))
        );
        assert_eq!(find(&["patients", "P1", "treatments"]), None);
        assert_eq!(find(&["embryos", "E1", "fate", "x"]), None);
        assert_eq!(find(&[]), None);
        let allow = |path: &str| {
            ROUTES
                .iter()
                .find(|route| route.path == path)
                .map(Route::allow)
                .unwrap()
        };
        assert_eq!(allow("patients"), "GET, HEAD, POST");
        assert_eq!(allow("patients/{patient_id}"), "GET, HEAD, PUT");
        assert_eq!(allow("embryos/{embryo_id}/fate"), "PUT");
        assert_eq!(allow("changes"), "GET, HEAD");
        let patients = ROUTES.iter().find(|r| r.path == "patients").unwrap();
        assert!(patients.handler("HEAD").is_some());
        assert!(patients.handler("DELETE").is_none());
    }

    #[test]
    fn derived_variables_need_both_events() {
        let annotations = [
            annotation("t2", 25.0),
            annotation("t3", 36.5),
            annotation("t4", 37.25),
        ];
        assert_eq!(
            derived_variables(&annotations),
            [("cc2", 11.5), ("s2", 0.75), ("ECC2", 12.25)]
        );
    }

    #[test]
    fn path_and_file_name_parts() {
        assert_eq!(path_part("D 1/2"), "D%201%2F2");
        assert_eq!(file_name_part("E/1:2"), "E_1_2");
        for usable in ["MRN-1", "a/b", "...", ".a", "Sørensen"] {
            assert!(usable_in_path(usable), "{usable:?}");
        }
        for unusable in [".", "..", "a\nb", "\u{7f}"] {
            assert!(!usable_in_path(unusable), "{unusable:?}");
        }
    }
}
