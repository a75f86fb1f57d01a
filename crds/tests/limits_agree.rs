//! The CRD schema (what the API server accepts) and `validate` (what the operator and the
//! trainer accept) agree on every numeric bound: each bounded field of the generated schema is
//! set at and just past its bounds in an otherwise valid spec, and `validate` must accept exactly
//! the values the schema accepts. Every limit of `medmerge_crds::limits` must be in the schema.

use kube::CustomResourceExt;
use medmerge_crds::{limits, validate, MergeJob, MergeJobSpec};
use serde_json::{json, Value};

/// A bounded field found in the schema: its path in the spec (`shards[0].x`) and its bounds.
#[derive(Debug)]
struct SchemaBound {
    path: String,
    integer: bool,
    min: Option<f64>,
    max: Option<f64>,
    min_exclusive: bool,
    max_exclusive: bool,
}

fn spec_schema() -> Value {
    let crd = serde_json::to_value(MergeJob::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

fn walk(schema: &Value, path: &str, out: &mut Vec<SchemaBound>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            let child = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
            walk(sub, &child, out);
        }
    }
    if let Some(items) = schema.get("items") {
        walk(items, &format!("{path}[0]"), out);
    }
    let number = |k: &str| schema.get(k).and_then(Value::as_f64);
    if number("minimum").is_some() || number("maximum").is_some() {
        out.push(SchemaBound {
            path: path.to_string(),
            integer: schema["type"] == "integer",
            min: number("minimum"),
            max: number("maximum"),
            min_exclusive: schema.get("exclusiveMinimum") == Some(&json!(true)),
            max_exclusive: schema.get("exclusiveMaximum") == Some(&json!(true)),
        });
    }
}

/// A valid spec with every optional object that holds a bounded field present.
fn good() -> Value {
    let spec: MergeJobSpec = serde_yaml::from_str(
        r#"
model: {architecture: efficientnet-lite0}
shards:
  - {name: a, data: {path: a}}
  - {name: b, data: {path: b}}
evaluation: {data: {path: test}}
"#,
    )
    .unwrap();
    serde_json::to_value(spec).unwrap()
}

fn set(spec: &mut Value, path: &str, value: Value) {
    let mut at = spec;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (name, index) = match part.strip_suffix("[0]") {
            Some(name) => (name, true),
            None => (*part, false),
        };
        let last = i + 1 == parts.len();
        if last && !index {
            at[name] = value;
            return;
        }
        if at.get(name).is_none_or(Value::is_null) {
            at[name] = if index { json!([{}]) } else { json!({}) };
        }
        at = &mut at[name];
        if index {
            at = &mut at[0];
        }
    }
}

/// Whether a spec with `path` set to `value` gets through deserialization and `validate`
/// without an error naming that field.
fn accepted(path: &str, value: f64, integer: bool) -> bool {
    let mut spec = good();
    set(&mut spec, path, if integer { json!(value as i64) } else { json!(value) });
    let Ok(spec) = serde_json::from_value::<MergeJobSpec>(spec) else { return false };
    match validate(&spec) {
        Ok(()) => true,
        Err(errors) => !errors.iter().any(|e| e.field == path),
    }
}

fn schema_bounds() -> Vec<SchemaBound> {
    let mut bounds = Vec::new();
    walk(&spec_schema(), "", &mut bounds);
    bounds
}

#[test]
fn validate_accepts_exactly_what_the_crd_schema_accepts_at_and_past_every_bound() {
    let bounds = schema_bounds();
    assert!(bounds.len() >= 15, "the walk found too few bounded fields: {bounds:?}");
    let mut disagreements = Vec::new();
    for b in &bounds {
        let step = |v: f64| if b.integer { 1.0 } else { 1e-6 * v.abs().max(1.0) };
        let mut cases = Vec::new();
        if let Some(min) = b.min {
            cases.push((min, !b.min_exclusive));
            cases.push((min - step(min), false));
            if b.min_exclusive {
                cases.push((min + step(min), true));
            }
        }
        if let Some(max) = b.max {
            cases.push((max, !b.max_exclusive));
            cases.push((max + step(max), false));
            if b.max_exclusive {
                cases.push((max - step(max), true));
            }
        }
        for (value, schema_accepts) in cases {
            if accepted(&b.path, value, b.integer) != schema_accepts {
                disagreements.push(format!("{} = {value}: schema {}, validate the opposite", b.path, if schema_accepts { "accepts" } else { "refuses" }));
            }
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

#[test]
fn every_limit_is_a_bound_of_the_crd_schema() {
    let bounds = schema_bounds();
    for limit in limits::all() {
        let Some(b) = bounds.iter().find(|b| b.path == limit.field) else { panic!("{} has a limit but no bound in the CRD schema", limit.field) };
        assert_eq!(b.min, Some(limit.min), "{}: minimum", limit.field);
        assert_eq!(b.max, limit.max, "{}: maximum", limit.field);
        assert_eq!((b.min_exclusive, b.max_exclusive), (limit.min_exclusive, limit.max_exclusive), "{}: exclusive bounds", limit.field);
    }
}
