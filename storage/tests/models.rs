//! Models in the store: a document imported becomes a version (the same document again is
//! no new version, a changed one is the next), an evaluation stores the result with the
//! model and version, the user and the time, mirrors it as the embryo's score, marks the
//! version used, and is recomputed in the transaction that changes one of its inputs.

use es_storage::*;

mod common;
use common::{open, setup, T0};

/// The dish's insemination time in `common::setup`.
const INSEMINATION_MS: i64 = T0 - 3_600_000;

fn meseguer() -> String {
    let cases: serde_json::Value =
        serde_json::from_str(include_str!("../models/tests/cases.json")).unwrap();
    serde_json::to_string_pretty(&cases["models"]["meseguer"]).unwrap()
}

fn actor(user: &str) -> Actor {
    Actor {
        user: user.into(),
        computer: "PC-1".into(),
    }
}

fn edit(
    writer: &Writer,
    user: &str,
    edit: ClinicalEdit,
) -> Result<Edited, WriteError<EditRefusal>> {
    writer.write(Edit {
        actor: actor(user),
        edit,
        idempotency: None,
        at_ms: T0 + 1000,
    })
}

/// The id of the embryo's annotation `name`.
fn annotation_id(store: &Store, embryo_id: &str, name: &str) -> u64 {
    store
        .read()
        .unwrap()
        .embryo(embryo_id)
        .unwrap()
        .unwrap()
        .annotations
        .iter()
        .find(|a| a.name == name)
        .unwrap()
        .annotation_id
}

fn timing(embryo_id: &str, version: u64, name: &str, hours: f64) -> ClinicalEdit {
    ClinicalEdit::AddAnnotation {
        embryo_id: embryo_id.into(),
        expected_version: version,
        annotation: AnnotationInput {
            name: name.into(),
            value: String::new(),
            event_at_ms: Some(INSEMINATION_MS + (hours * 3_600_000.0).round() as i64),
            source: AnnotationSource::Manual,
        },
    }
}

#[test]
fn evaluations_are_stored_versioned_mirrored_and_recomputed_when_an_input_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());
    setup(&writer);
    let import = |document: String| {
        writer.write(ModelImport {
            actor: actor("admin"),
            document,
            at_ms: T0,
        })
    };

    // Versions: new, the same again, changed.
    let first = import(meseguer()).unwrap();
    assert_eq!((first.version, first.created), (1, true));
    assert_eq!(
        import(meseguer()).unwrap(),
        ModelImported {
            created: false,
            ..first.clone()
        }
    );
    let changed = meseguer().replace("Exclusions, then", "Exclusions first, then");
    assert_eq!(import(changed.clone()).unwrap().version, 2);
    let invalid = import("{\"format\": \"esserver-model/1\"}".into());
    assert!(
        matches!(invalid, Err(WriteError::InvalidInput(_))),
        "{invalid:?}"
    );

    // EB1's timings (case M1): t2 26.1, t3 37.4, t4 38.0, t5 50.2 h.
    let mut version = 1;
    for (name, hours) in [("t2", 26.1), ("t3", 37.4), ("t4", 38.0), ("t5", 50.2)] {
        version = edit(&writer, "anna", timing("EB1", version, name, hours))
            .unwrap()
            .version;
    }
    let name = "Hierarchical after Meseguer 2011";
    let evaluate = |version: u64, model: &str| ClinicalEdit::Evaluate {
        embryo_id: "EB1".into(),
        expected_version: version,
        model: model.into(),
        version: None,
    };
    let edited = edit(&writer, "anna", evaluate(version, name)).unwrap();
    version = edited.version;
    let reader = store.read().unwrap();
    let results = reader.model_results("EB1").unwrap().unwrap();
    assert_eq!(results.len(), 1);
    let result = &results[0];
    assert_eq!(
        (result.outcome, result.value.as_str(), result.version),
        ("category", "A+", 2)
    );
    assert_eq!(
        result.rule,
        "t5 in [48.8, 56.61) -> s2 < 0.77 -> cc2 < 11.91 -> A+"
    );
    assert_eq!(result.variables["cc2"], 11.3);
    assert_eq!(result.set_by, "anna");
    let embryo = reader.embryo("EB1").unwrap().unwrap();
    let score = embryo.scores.iter().find(|s| s.model == name).unwrap();
    assert_eq!(
        (score.value.as_str(), score.model_version.as_str()),
        ("A+", "v2")
    );
    let models = reader.models().unwrap();
    assert_eq!(models.len(), 2);
    assert!(!models[0].used && models[1].used, "{models:?}");
    assert_eq!(reader.model(name, None).unwrap().unwrap().document, changed);
    drop(reader);
    // The model's score is the server's: a person cannot set it over the result.
    let overwrite = edit(
        &writer,
        "anna",
        ClinicalEdit::SetScore {
            embryo_id: "EB1".into(),
            expected_version: version,
            score: ScoreInput {
                model: name.into(),
                model_version: "x".into(),
                value: "A-".into(),
                viability: String::new(),
            },
        },
    );
    assert!(
        matches!(overwrite, Err(WriteError::InvalidInput(_))),
        "{overwrite:?}"
    );

    // An annotation changes: the result follows in the same transaction (t4 38.6: s2 1.2).
    let t4 = annotation_id(&store, "EB1", "t4");
    let change = ClinicalEdit::ChangeAnnotation {
        embryo_id: "EB1".into(),
        expected_version: version,
        annotation_id: t4,
        annotation: AnnotationInput {
            name: "t4".into(),
            value: String::new(),
            event_at_ms: Some(INSEMINATION_MS + 38_600 * 3_600),
            source: AnnotationSource::Manual,
        },
    };
    version = edit(&writer, "bo", change).unwrap().version;
    let result = &store.read().unwrap().model_results("EB1").unwrap().unwrap()[0];
    assert_eq!(
        (result.value.as_str(), result.set_by.as_str()),
        ("B+", "bo")
    );

    // t5 removed: not available, and the embryo's score of the model goes.
    let t5 = annotation_id(&store, "EB1", "t5");
    let remove = ClinicalEdit::RemoveAnnotation {
        embryo_id: "EB1".into(),
        expected_version: version,
        annotation_id: t5,
    };
    version = edit(&writer, "bo", remove).unwrap().version;
    let reader = store.read().unwrap();
    let result = &reader.model_results("EB1").unwrap().unwrap()[0];
    assert_eq!(result.outcome, "not_available");
    assert!(
        result.value.contains("t5 is not annotated"),
        "{}",
        result.value
    );
    assert!(reader
        .embryo("EB1")
        .unwrap()
        .unwrap()
        .scores
        .iter()
        .all(|s| s.model != name));
    drop(reader);

    // An unknown model is refused and changes nothing; the store verifies clean.
    let unknown = edit(&writer, "anna", evaluate(version, "no such model"));
    assert!(
        matches!(unknown, Err(WriteError::Refused(EditRefusal::NotFound(_)))),
        "{unknown:?}"
    );
    assert_eq!(
        store
            .read()
            .unwrap()
            .embryo("EB1")
            .unwrap()
            .unwrap()
            .version,
        version
    );
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
}
