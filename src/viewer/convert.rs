//! Storage records to viewer protocol messages, and protocol writes to storage edits.

use es_proto::viewer::pb;
use es_storage::{
    AnnotationInput, AnnotationRecord, AnnotationSource, ClinicalEdit, Current, DishRecord,
    EmbryoRecord, Fate, Frame, PatientRecord, PatientRef, TreatmentRecord,
};
use serde_json::json;

pub fn patient(record: PatientRecord) -> pb::Patient {
    pb::Patient {
        patient_id: record.patient_id,
        first_name: record.first_name,
        last_name: record.last_name,
        date_of_birth: record.date_of_birth,
        version: record.version,
        treatments: record.treatments.into_iter().map(treatment).collect(),
        patient_idx: record.patient_idx,
        details_differ: record.details_differ.map(|d| pb::PatientDifference {
            instrument_serial: d.instrument_serial,
            dish_id: d.dish_id,
            first_name: d.first_name,
            last_name: d.last_name,
            date_of_birth: d.date_of_birth,
            at_ms: d.at_ms,
            times: d.times,
        }),
    }
}

pub fn treatment(record: TreatmentRecord) -> pb::Treatment {
    pb::Treatment {
        patient_id: record.patient_id,
        name: record.name,
        comment: record.comment,
        version: record.version,
        created_at_ms: record.created_at_ms,
    }
}

pub fn dish(record: DishRecord, embryos: Vec<EmbryoRecord>) -> pb::Dish {
    pb::Dish {
        dish_key: record.dish_key,
        dish_id: record.dish_id,
        instrument_serial: record.instrument_serial,
        instrument_number: record.instrument_number,
        slot: record.slot,
        patient_id: record.patient_id,
        treatment_name: record.treatment_name,
        insemination_at_ms: record.insemination_at_ms,
        embryos: embryos.into_iter().map(embryo).collect(),
        wells: record.wells.into_iter().map(|(well, _)| well).collect(),
        fertilization_method: record.fertilization_method,
    }
}

pub fn embryo(record: EmbryoRecord) -> pb::Embryo {
    pb::Embryo {
        embryo_id: record.embryo_id,
        dish_key: record.dish_key,
        dish_id: record.dish_id,
        well: record.well,
        patient_id: record.patient_id,
        treatment_name: record.treatment_name,
        insemination_at_ms: record.insemination_at_ms,
        version: record.version,
        fate: record.fate.as_str().to_string(),
        comment: record.comment,
        annotations: record.annotations.into_iter().map(annotation).collect(),
        instrument_serial: record.instrument_serial,
        instrument_number: record.instrument_number,
        label: record.label,
        fertilization_method: record.fertilization_method,
    }
}

fn annotation(record: AnnotationRecord) -> pb::Annotation {
    pb::Annotation {
        annotation_id: record.annotation_id,
        name: record.name,
        value: record.value,
        event_at_ms: record.event_at_ms.unwrap_or(0),
        has_event: record.event_at_ms.is_some(),
        hours: record.hours.unwrap_or(0.0),
        source: record.source.as_str().to_string(),
        set_by: record.set_by,
        set_at_ms: record.set_at_ms,
    }
}

pub fn image(embryo_id: &str, frame: Frame) -> pb::Image {
    pb::Image {
        embryo_id: embryo_id.to_string(),
        acquired_at_ms: frame.acquired_at_ms,
        focal_plane: frame.focal_plane,
        jpeg: frame.jpeg,
    }
}

/// A protocol write as a storage edit, or the reason it is invalid.
/// The clinical edit a request asks for: None when it is not an edit (it is handed back),
/// Some(Err) when its fields do not make one.
#[allow(clippy::result_large_err)]
pub fn edit(
    request: pb::client_message::Request,
) -> Result<Result<ClinicalEdit, String>, pb::client_message::Request> {
    use pb::client_message::Request;
    // A field that does not make an edit ends the conversion with its message.
    macro_rules! or_refuse {
        ($field:expr) => {
            match $field {
                Ok(value) => value,
                Err(message) => return Ok(Err(message)),
            }
        };
    }
    Ok(Ok(match request {
        Request::CreatePatient(p) => ClinicalEdit::CreatePatient {
            patient: PatientRef {
                patient_id: p.patient_id,
                first_name: p.first_name,
                last_name: p.last_name,
                date_of_birth: p.date_of_birth,
                patient_idx: String::new(),
            },
        },
        Request::UpdatePatient(p) => ClinicalEdit::UpdatePatient {
            patient: PatientRef {
                patient_id: p.patient_id,
                first_name: p.first_name,
                last_name: p.last_name,
                date_of_birth: p.date_of_birth,
                patient_idx: String::new(),
            },
            expected_version: p.expected_version,
        },
        Request::CreateTreatment(t) => ClinicalEdit::CreateTreatment {
            patient_id: t.patient_id,
            name: t.name,
            comment: t.comment,
        },
        Request::UpdateTreatment(t) => ClinicalEdit::UpdateTreatment {
            patient_id: t.patient_id,
            name: t.name,
            comment: t.comment,
            expected_version: t.expected_version,
        },
        Request::AddAnnotation(a) => ClinicalEdit::AddAnnotation {
            embryo_id: a.embryo_id,
            expected_version: a.expected_version,
            annotation: or_refuse!(annotation_input(a.annotation)),
        },
        Request::ChangeAnnotation(a) => ClinicalEdit::ChangeAnnotation {
            embryo_id: a.embryo_id,
            expected_version: a.expected_version,
            annotation_id: a.annotation_id,
            annotation: or_refuse!(annotation_input(a.annotation)),
        },
        Request::RemoveAnnotation(a) => ClinicalEdit::RemoveAnnotation {
            embryo_id: a.embryo_id,
            expected_version: a.expected_version,
            annotation_id: a.annotation_id,
        },
        Request::SetFate(f) => ClinicalEdit::SetFate {
            embryo_id: f.embryo_id,
            expected_version: f.expected_version,
            fate: or_refuse!(Fate::from_name(&f.fate).ok_or_else(|| {
                format!(
                    "fate {:?} is not one of undecided, transfer, freeze, avoid",
                    f.fate
                )
            })),
        },
        Request::SetEmbryoComment(c) => ClinicalEdit::SetEmbryoComment {
            embryo_id: c.embryo_id,
            expected_version: c.expected_version,
            comment: c.comment,
        },
        Request::Evaluate(e) => ClinicalEdit::Evaluate {
            embryo_id: e.embryo_id,
            expected_version: e.expected_version,
            model: e.model,
            version: (e.version != 0).then_some(e.version),
        },
        other => return Err(other),
    }))
}

fn annotation_input(input: Option<pb::AnnotationInput>) -> Result<AnnotationInput, String> {
    let input = input.ok_or("the annotation is missing")?;
    let source = if input.source.is_empty() {
        AnnotationSource::Manual
    } else {
        AnnotationSource::from_name(&input.source).ok_or_else(|| {
            format!(
                "annotation source {:?} is not one of manual, guided, automatic, computed",
                input.source
            )
        })?
    };
    Ok(AnnotationInput {
        name: input.name,
        value: input.value,
        event_at_ms: input.has_event.then_some(input.event_at_ms),
        source,
    })
}

/// A conflict's `current_json`: the record as it is now, in the shape docs/protocol/viewer.md
/// gives (for an embryo: id, version, fate, comment, annotations and scores). `{}` when the
/// record could not be read after the commit.
pub fn current_json(current: Option<&Current>) -> String {
    let value = match current {
        None => json!({}),
        Some(Current::Patient(p)) => json!({
            "patient_id": p.patient_id,
            "first_name": p.first_name,
            "last_name": p.last_name,
            "date_of_birth": p.date_of_birth,
            "version": p.version,
        }),
        Some(Current::Treatment(t)) => {
            json!({ "name": t.name, "comment": t.comment, "version": t.version })
        }
        Some(Current::Embryo(e)) => json!({
            "embryo_id": e.embryo_id,
            "version": e.version,
            "fate": e.fate.as_str(),
            "comment": e.comment,
            "annotations": e.annotations.iter().map(|a| json!({
                "annotation_id": a.annotation_id,
                "name": a.name,
                "value": a.value,
                "event_at_ms": a.event_at_ms,
                "source": a.source.as_str(),
                "set_by": a.set_by,
                "set_at_ms": a.set_at_ms,
            })).collect::<Vec<_>>(),
            "scores": e.scores.iter().map(|s| json!({
                "model": s.model,
                "model_version": s.model_version,
                "value": s.value,
                "viability": s.viability,
                "set_by": s.set_by,
                "set_at_ms": s.set_at_ms,
            })).collect::<Vec<_>>(),
        }),
        Some(Current::Transfer(t)) => json!({
            "transferred_at_ms": t.transferred_at_ms,
            "embryo_ids": t.embryo_ids,
            "outcome": t.outcome,
            "comment": t.comment,
            "version": t.version,
        }),
    };
    value.to_string()
}

pub fn model_summary(record: &es_storage::ModelRecord) -> pb::ModelSummary {
    pb::ModelSummary {
        name: record.name.clone(),
        version: record.version,
        kind: record.kind.clone(),
        imported_by: record.imported_by.clone(),
        imported_at_ms: record.imported_at_ms,
        used: record.used,
    }
}

pub fn evaluation(record: es_storage::ModelResultRecord) -> pb::Evaluation {
    pb::Evaluation {
        model: record.model,
        version: record.version,
        outcome: record.outcome.to_string(),
        value: record.value,
        rule: record.rule,
        variables: record
            .variables
            .into_iter()
            .map(|(name, value)| pb::Variable { name, value })
            .collect(),
        set_by: record.set_by,
        set_at_ms: record.set_at_ms,
    }
}

pub fn activity(embryo_id: String, curve: crate::activity::EmbryoActivity) -> pb::Activity {
    let hours = [
        curve.proposed.t2,
        curve.proposed.t3,
        curve.proposed.t4,
        curve.proposed.t5,
    ];
    pb::Activity {
        embryo_id,
        focal_plane: curve.focal_plane,
        points: curve
            .points
            .iter()
            .map(|p| pb::ActivityPoint {
                acquired_at_ms: p.acquired_at_ms,
                activity: p.activity,
            })
            .collect(),
        proposed: ["t2", "t3", "t4", "t5"]
            .into_iter()
            .zip(hours)
            .zip(&curve.proposed_at_ms)
            .filter_map(|((event, hours), at)| {
                hours.map(|hours| pb::ProposedTime {
                    event: event.to_string(),
                    hours,
                    acquired_at_ms: *at,
                })
            })
            .collect(),
        frames_skipped: curve.frames_skipped,
        analysed_through_ms: curve.through_ms.unwrap_or(0),
        has_analysed: curve.through_ms.is_some(),
        stored: curve.stored,
        pending: curve.pending,
    }
}
