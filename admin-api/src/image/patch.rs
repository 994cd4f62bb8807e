//! Image updates: Glance's two json-patch media types, checked as far as the request alone
//! allows, then applied to the image as it stands inside the service's transaction.

use serde_json::Value;

use super::error::{GlanceError, GlanceResult};
use super::props::{self, BaseValue};
use super::service::{Image, ImageEdit};
use crate::model::ServiceError;

pub const V20: &str = "application/openstack-images-v2.0-json-patch";
pub const V21: &str = "application/openstack-images-v2.1-json-patch";
pub const ACCEPT_PATCH: &str =
    "application/openstack-images-v2.0-json-patch, application/openstack-images-v2.1-json-patch";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// RFC 6902 style: `{"op": "add", "path": "/x", "value": ...}`; `add` overwrites.
    V21,
    /// Draft style: `{"add": "/x", "value": ...}`; `add` of a present property conflicts.
    V20,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Replace,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Replace => "replace",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    Base(&'static str, Option<BaseValue>),
    Extra(String, Option<String>),
}

#[derive(Debug, Clone, PartialEq)]
struct Change {
    op: Op,
    target: Target,
}

/// The dialect a `Content-Type` names; PUT (seed 004) also takes plain JSON as 2.1.
pub fn dialect(content_type: Option<&str>, allow_json: bool) -> GlanceResult<Dialect> {
    let ct = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match ct.as_str() {
        V21 => Ok(Dialect::V21),
        V20 => Ok(Dialect::V20),
        "application/json" if allow_json => Ok(Dialect::V21),
        _ => Err(GlanceError::media_type(
            content_type,
            format!("Image PATCH expects Content-Type one of: {ACCEPT_PATCH}"),
        )
        .with_header(
            axum::http::HeaderName::from_static("accept-patch"),
            ACCEPT_PATCH,
        )),
    }
}

fn bad(m: impl Into<String>) -> GlanceError {
    GlanceError::bad_request(m)
}

fn decode_pointer(p: &str) -> GlanceResult<Vec<String>> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err(bad(format!("Pointer `{p}` does not start with \"/\".")));
    };
    if p.contains("//") {
        return Err(bad(format!("Pointer `{p}` contains adjacent \"/\".")));
    }
    if p.len() > 1 && p.ends_with('/') {
        return Err(bad(format!("Pointer `{p}` end with \"/\".")));
    }
    let mut out = Vec::new();
    for token in rest.split('/') {
        if token.trim().is_empty() {
            return Err(bad(format!("Pointer `{p}` does not contains valid token.")));
        }
        let mut t = String::new();
        let mut chars = token.chars();
        while let Some(c) = chars.next() {
            if c == '~' {
                match chars.next() {
                    Some('0') => t.push('~'),
                    Some('1') => t.push('/'),
                    _ => {
                        return Err(bad(format!(
                            "Pointer `{p}` contains \"~\" not part of a recognized escape sequence."
                        )));
                    }
                }
            } else {
                t.push(c);
            }
        }
        out.push(t);
    }
    Ok(out)
}

fn base_key(k: &str) -> Option<&'static str> {
    props::BASE.iter().copied().find(|b| *b == k)
}

/// Parses and checks a patch body (everything that does not depend on the image).
fn parse(body: &Value, dialect: Dialect) -> GlanceResult<Vec<Change>> {
    let Value::Array(items) = body else {
        return Err(bad(
            "Request body must be a JSON array of operation objects.",
        ));
    };
    let mut changes = Vec::new();
    for item in items {
        let Value::Object(obj) = item else {
            return Err(bad("Operations must be JSON objects."));
        };
        let (op, path) = match dialect {
            Dialect::V21 => {
                let op = match obj.get("op") {
                    None => {
                        return Err(bad(
                            "Unable to find `op` in JSON Schema change. It must be one of the following: add, remove, replace.",
                        ));
                    }
                    Some(Value::String(s)) if s == "add" => Op::Add,
                    Some(Value::String(s)) if s == "remove" => Op::Remove,
                    Some(Value::String(s)) if s == "replace" => Op::Replace,
                    Some(other) => {
                        let shown = other
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| other.to_string());
                        return Err(bad(format!(
                            "Invalid operation: `{shown}`. It must be one of the following: add, remove, replace."
                        )));
                    }
                };
                let Some(path) = obj.get("path") else {
                    return Err(bad("Unable to find 'path' in JSON Schema change"));
                };
                (op, path)
            }
            Dialect::V20 => {
                let present: Vec<(Op, &Value)> = [Op::Add, Op::Remove, Op::Replace]
                    .into_iter()
                    .filter_map(|op| obj.get(op.name()).map(|p| (op, p)))
                    .collect();
                match present.as_slice() {
                    [] => {
                        return Err(bad(
                            "Operation objects must contain exactly one member named \"add\", \"remove\", or \"replace\".",
                        ));
                    }
                    [one] => *one,
                    _ => {
                        return Err(bad(
                            "Operation objects must contain only one member named \"add\", \"remove\", or \"replace\".",
                        ));
                    }
                }
            }
        };
        let Value::String(path) = path else {
            return Err(bad(format!("Pointer `{path}` does not start with \"/\".")));
        };
        let tokens = decode_pointer(path)?;
        let root = tokens[0].clone();
        if props::is_reserved(&root) {
            return Err(props::reserved(&root));
        }
        if tokens.len() != 1 {
            return Err(bad(format!(
                "Invalid JSON pointer for this resource: '{path}'"
            )));
        }
        if props::READ_ONLY.contains(&root.as_str()) {
            return Err(props::read_only(&root));
        }
        let value = match op {
            Op::Remove => None,
            Op::Add | Op::Replace => Some(obj.get("value").ok_or_else(|| {
                bad(format!(
                    "Operation \"{}\" requires a member named \"value\".",
                    op.name()
                ))
            })?),
        };
        let target = match base_key(&root) {
            Some(b) => Target::Base(b, value.map(|v| props::base_value(b, v)).transpose()?),
            None => Target::Extra(
                root.clone(),
                value.map(|v| props::extra_value(&root, v)).transpose()?,
            ),
        };
        changes.push(Change { op, target });
    }
    Ok(changes)
}

impl From<GlanceError> for ServiceError {
    fn from(e: GlanceError) -> Self {
        match e.status.as_u16() {
            403 => ServiceError::Forbidden(e.explanation),
            404 => ServiceError::NotFound(e.explanation),
            409 => ServiceError::Conflict(e.explanation),
            413 => ServiceError::OverLimit(e.explanation),
            415 => ServiceError::Unsupported(e.explanation),
            401 => ServiceError::Unauthorized(e.explanation),
            500.. => ServiceError::Internal(e.explanation),
            _ => ServiceError::BadRequest(e.explanation),
        }
    }
}

/// The edit a patch body asks for, to be applied by the service to the image as it is.
pub fn edit(body: &Value, dialect: Dialect, is_admin: bool) -> GlanceResult<ImageEdit> {
    let changes = parse(body, dialect)?;
    Ok(Box::new(move |image: &mut Image| {
        apply(image, &changes, dialect, is_admin).map_err(ServiceError::from)
    }))
}

fn apply(
    image: &mut Image,
    changes: &[Change],
    dialect: Dialect,
    is_admin: bool,
) -> GlanceResult<()> {
    let props_before = props::counted_properties(image.properties.keys());
    for change in changes {
        match (&change.target, change.op) {
            (Target::Base(key, _), Op::Remove) => {
                return Err(GlanceError::forbidden(format!(
                    "Property {key} may not be removed."
                )));
            }
            (Target::Base(key, Some(value)), _) => set_base(image, key, value.clone(), is_admin)?,
            (Target::Base(_, None), _) => {}
            (Target::Extra(key, _), Op::Remove) => {
                if image.properties.remove(key).is_none() {
                    return Err(GlanceError::conflict(format!(
                        "Property {key} does not exist."
                    )));
                }
            }
            (Target::Extra(key, value), op) => {
                let present = image.properties.contains_key(key);
                if op == Op::Replace && !present {
                    return Err(GlanceError::conflict(format!(
                        "Property {key} does not exist."
                    )));
                }
                if op == Op::Add && present && dialect == Dialect::V20 {
                    return Err(GlanceError::conflict(format!(
                        "Property {key} already present."
                    )));
                }
                image
                    .properties
                    .insert(key.clone(), value.clone().unwrap_or_default());
            }
        }
    }
    let after = props::counted_properties(image.properties.keys());
    if after > props_before && after > props::PROPERTY_QUOTA {
        return Err(props::property_quota(after));
    }
    if image.tags.len() > props::TAG_QUOTA {
        return Err(props::tag_quota(image.tags.len()));
    }
    Ok(())
}

fn set_base(image: &mut Image, key: &str, value: BaseValue, is_admin: bool) -> GlanceResult<()> {
    match (key, value) {
        ("name", BaseValue::Text(v)) => image.name = v,
        ("owner", BaseValue::Text(v)) => {
            if !is_admin {
                return Err(GlanceError::forbidden(
                    "Owner can't be updated by non admin.",
                ));
            }
            image.owner = v;
        }
        ("visibility", BaseValue::Text(Some(v))) => {
            if v == "public" && image.visibility != "public" && !is_admin {
                return Err(GlanceError::forbidden(
                    "You are not authorized to complete publicize_image action.",
                ));
            }
            image.visibility = v;
        }
        (k @ ("disk_format" | "container_format"), BaseValue::Text(v)) => {
            let current = if k == "disk_format" {
                &mut image.disk_format
            } else {
                &mut image.container_format
            };
            if *current != v {
                if !matches!(image.status.as_str(), "queued" | "importing") {
                    return Err(GlanceError::forbidden(format!(
                        "Attribute {k} can be only replaced for a queued image."
                    )));
                }
                *current = v;
            }
        }
        ("protected", BaseValue::Bool(b)) => image.protected = b,
        ("os_hidden", BaseValue::Bool(b)) => image.os_hidden = b,
        ("min_ram", BaseValue::Int(n)) => image.min_ram = n,
        ("min_disk", BaseValue::Int(n)) => image.min_disk = n,
        ("tags", BaseValue::Tags(t)) => image.tags = t,
        (k, _) => return Err(props::read_only(k)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;
    use time::OffsetDateTime;

    fn image() -> Image {
        Image {
            id: "i".into(),
            name: Some("cirros".into()),
            status: "active".into(),
            visibility: "shared".into(),
            protected: false,
            os_hidden: false,
            owner: Some("p".into()),
            disk_format: Some("qcow2".into()),
            container_format: Some("bare".into()),
            size: None,
            virtual_size: None,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            min_ram: 0,
            min_disk: 0,
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
            tags: vec![],
            properties: BTreeMap::from([("sw_wrs_auto_recovery".into(), "True".into())]),
            direct_url: None,
        }
    }

    fn run(body: Value, dialect: Dialect, admin: bool) -> Result<Image, String> {
        let mut img = image();
        let edit = edit(&body, dialect, admin)
            .map_err(|e| format!("{} {}", e.status.as_u16(), e.explanation))?;
        edit(&mut img)
            .map_err(GlanceError::from)
            .map_err(|e| format!("{} {}", e.status.as_u16(), e.explanation))?;
        Ok(img)
    }

    #[test]
    fn the_seeds_patch_applies() {
        let img = run(
            json!([
                {"path": "/hw_wrs_live_migration_timeout", "value": "500", "op": "add"},
                {"path": "/sw_wrs_auto_recovery", "value": "true", "op": "replace"},
                {"path": "/hw_wrs_live_migration_max_downtime", "value": "300", "op": "add"},
                {"op": "replace", "path": "/name", "value": "x"},
                {"op": "add", "path": "/tags", "value": ["a"]}
            ]),
            Dialect::V21,
            false,
        )
        .unwrap();
        assert_eq!(img.properties["hw_wrs_live_migration_timeout"], "500");
        assert_eq!(img.properties["sw_wrs_auto_recovery"], "True");
        assert_eq!(img.name.as_deref(), Some("x"));
        assert_eq!(img.tags, ["a"]);
    }

    #[test]
    fn glances_patch_errors() {
        let cases = [
            (
                json!({}),
                "400 Request body must be a JSON array of operation objects.",
            ),
            (json!([1]), "400 Operations must be JSON objects."),
            (
                json!([{"path": "/x"}]),
                "400 Unable to find `op` in JSON Schema change. It must be one of the following: add, remove, replace.",
            ),
            (
                json!([{"op": "move", "path": "/x"}]),
                "400 Invalid operation: `move`. It must be one of the following: add, remove, replace.",
            ),
            (
                json!([{"op": "add"}]),
                "400 Unable to find 'path' in JSON Schema change",
            ),
            (
                json!([{"op": "add", "path": "x", "value": "1"}]),
                "400 Pointer `x` does not start with \"/\".",
            ),
            (
                json!([{"op": "add", "path": "/a/b", "value": "1"}]),
                "400 Invalid JSON pointer for this resource: '/a/b'",
            ),
            (
                json!([{"op": "add", "path": "/a~2", "value": "1"}]),
                "400 Pointer `/a~2` contains \"~\" not part of a recognized escape sequence.",
            ),
            (
                json!([{"op": "add", "path": "/x"}]),
                "400 Operation \"add\" requires a member named \"value\".",
            ),
            (
                json!([{"op": "replace", "path": "/status", "value": "active"}]),
                "403 Attribute 'status' is read-only.",
            ),
            (
                json!([{"op": "add", "path": "/cache_raw_status", "value": "Cached"}]),
                "403 Attribute 'cache_raw_status' is read-only.",
            ),
            (
                json!([{"op": "add", "path": "/os_glance_x", "value": "1"}]),
                "403 Attribute 'os_glance_x' is reserved.",
            ),
            (
                json!([{"op": "replace", "path": "/nope", "value": "1"}]),
                "409 Property nope does not exist.",
            ),
            (
                json!([{"op": "remove", "path": "/nope"}]),
                "409 Property nope does not exist.",
            ),
            (
                json!([{"op": "remove", "path": "/name"}]),
                "403 Property name may not be removed.",
            ),
            (
                json!([{"op": "replace", "path": "/owner", "value": "q"}]),
                "403 Owner can't be updated by non admin.",
            ),
            (
                json!([{"op": "replace", "path": "/visibility", "value": "public"}]),
                "403 You are not authorized to complete publicize_image action.",
            ),
            (
                json!([{"op": "replace", "path": "/disk_format", "value": "raw"}]),
                "403 Attribute disk_format can be only replaced for a queued image.",
            ),
            (
                json!([{"op": "add", "path": "/hw_wrs_live_migration_timeout", "value": "5"}]),
                "400 hw_wrs_live_migration_timeout must be a number between 120 and 800 or 0, value: 5",
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                run(body.clone(), Dialect::V21, false).unwrap_err(),
                want,
                "{body}"
            );
        }
        assert_eq!(
            run(
                json!([{"add": "/sw_wrs_auto_recovery", "value": "False"}]),
                Dialect::V20,
                false
            )
            .unwrap_err(),
            "409 Property sw_wrs_auto_recovery already present."
        );
        assert_eq!(
            run(json!([{"add": "/a", "remove": "/b"}]), Dialect::V20, false).unwrap_err(),
            "400 Operation objects must contain only one member named \"add\", \"remove\", or \"replace\"."
        );
        // Admins may publish and give away.
        let img = run(json!([{"op": "replace", "path": "/visibility", "value": "public"}, {"op": "replace", "path": "/owner", "value": "q"}]), Dialect::V21, true).unwrap();
        assert_eq!(
            (img.visibility.as_str(), img.owner.as_deref()),
            ("public", Some("q"))
        );
        // An empty patch changes nothing.
        assert_eq!(run(json!([]), Dialect::V21, false).unwrap(), image());
    }

    #[test]
    fn quotas() {
        let ops: Vec<Value> = (0..128)
            .map(|i| json!({"op": "add", "path": format!("/p{i}"), "value": ""}))
            .collect();
        assert_eq!(
            run(Value::Array(ops), Dialect::V21, false).unwrap_err(),
            "413 The limit has been exceeded on the number of allowed image properties. Attempted: 129, Maximum: 128"
        );
        let tags: Vec<String> = (0..129).map(|i| format!("t{i}")).collect();
        assert!(
            run(
                json!([{"op": "replace", "path": "/tags", "value": tags}]),
                Dialect::V21,
                false
            )
            .unwrap_err()
            .starts_with("413 ")
        );
    }

    #[test]
    fn media_types() {
        assert_eq!(dialect(Some(V21), false).unwrap(), Dialect::V21);
        assert_eq!(
            dialect(
                Some("application/openstack-images-v2.0-json-patch; charset=UTF-8"),
                false
            )
            .unwrap(),
            Dialect::V20
        );
        let e = dialect(Some("application/json"), false).unwrap_err();
        assert_eq!(e.status.as_u16(), 415);
        assert_eq!(e.headers[0].1, ACCEPT_PATCH);
        assert_eq!(
            dialect(Some("application/json"), true).unwrap(),
            Dialect::V21
        );
    }
}
