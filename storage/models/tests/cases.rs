//! The hand-computed cases of `tests/cases.json`: every derived variable and every model
//! outcome the file states (with how it was worked out) is what es-models computes, exactly.

use es_models::{Embryo, Model, Outcome, Variable};
use serde_json::Value;
use std::collections::BTreeMap;

fn cases() -> Value {
    serde_json::from_str(include_str!("cases.json")).expect("cases.json parses")
}

fn embryo(case: &Value) -> Embryo {
    Embryo {
        events: serde_json::from_value(case["events"].clone()).unwrap_or_default(),
        annotations: serde_json::from_value(case["annotations"].clone()).unwrap_or_default(),
    }
}

#[test]
fn derived_variables_match_the_hand_computed_table() {
    let cases = cases();
    let list = cases["variables"].as_array().unwrap();
    assert!(list.len() >= 10);
    for case in list {
        let name = case["case"].as_str().unwrap();
        assert!(!case["how"].as_str().unwrap().is_empty(), "{name}: say how");
        let embryo = embryo(case);
        for (variable, expected) in case["expect"].as_object().unwrap() {
            let got = embryo.variable(variable);
            match (expected, &got) {
                (Value::Number(number), Variable::Hours(hours)) => {
                    assert_eq!(*hours, number.as_f64().unwrap(), "{name}: {variable}")
                }
                (Value::String(reason), Variable::NotAvailable(why)) => {
                    assert!(why.contains(reason.as_str()), "{name}: {variable}: {why}")
                }
                _ => panic!("{name}: {variable}: expected {expected}, got {got:?}"),
            }
        }
    }
}

#[test]
fn models_give_the_hand_computed_outcomes() {
    let cases = cases();
    let models: BTreeMap<String, Model> = cases["models"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, document)| {
            let bytes = serde_json::to_vec(document).unwrap();
            (key.clone(), Model::from_json(&bytes).expect(key))
        })
        .collect();
    let list = cases["evaluations"].as_array().unwrap();
    for kind in ["hierarchical", "additive", "multiplicative"] {
        let cases_of_kind = list
            .iter()
            .filter(|case| models[case["model"].as_str().unwrap()].kind() == kind)
            .count();
        assert!(cases_of_kind >= 4, "{kind}: {cases_of_kind} cases");
    }
    for case in list {
        let name = case["case"].as_str().unwrap();
        assert!(!case["how"].as_str().unwrap().is_empty(), "{name}: say how");
        let model = &models[case["model"].as_str().unwrap()];
        let evaluation = model.evaluate(&embryo(case));
        let expect = &case["expect"];
        match (&evaluation.outcome, expect) {
            (Outcome::Category(got), _) if expect["category"].is_string() => {
                assert_eq!(got, expect["category"].as_str().unwrap(), "{name}")
            }
            (Outcome::Score(got), _) if expect["score"].is_number() => {
                assert_eq!(*got, expect["score"].as_f64().unwrap(), "{name}")
            }
            (Outcome::NotAvailable(why), _) if expect["not_available"].is_string() => {
                let reason = expect["not_available"].as_str().unwrap();
                assert!(why.contains(reason), "{name}: {why}")
            }
            (got, _) => panic!(
                "{name}: expected {expect}, got {got:?} ({})",
                evaluation.rule
            ),
        }
        if let Some(rule) = case["rule"].as_str() {
            assert_eq!(evaluation.rule, rule, "{name}");
        }
    }
    assert!(
        list.len() + cases["variables"].as_array().unwrap().len() >= 20,
        "at least 20 hand-computed cases"
    );
}

#[test]
fn a_model_exported_and_imported_again_gives_identical_results() {
    let cases = cases();
    for (key, document) in cases["models"].as_object().unwrap() {
        let model = Model::from_json(&serde_json::to_vec(document).unwrap()).unwrap();
        let exported = model.to_json();
        let imported = Model::from_json(exported.as_bytes()).expect(key);
        assert_eq!(imported, model, "{key}");
        for case in cases["evaluations"].as_array().unwrap() {
            if case["model"] == key.as_str() {
                let embryo = embryo(case);
                assert_eq!(imported.evaluate(&embryo), model.evaluate(&embryo));
            }
        }
    }
}
