//! Image attributes: which are base, read-only or reserved, how values are checked against
//! the image schema, and the StarlingX properties (seed 004, stx-glance's rules).

use serde_json::Value;

use super::error::{GlanceError, GlanceResult};

/// Attributes no request may set (Glance's read-only lists, plus what cairn maintains: the
/// raw cache's state and the store). `id` may be given on create only.
pub const READ_ONLY: [&str; 21] = [
    "created_at",
    "updated_at",
    "status",
    "checksum",
    "size",
    "virtual_size",
    "direct_url",
    "self",
    "file",
    "schema",
    "id",
    "os_hash_algo",
    "os_hash_value",
    "stores",
    "store",
    "cache_raw_status",
    "cache_raw_size",
    "cache_raw_url",
    "cache_raw_error",
    "cache_raw_progress",
    "os_glance_import_task",
];

/// Reserved names (and the `os_glance` namespace).
pub fn is_reserved(key: &str) -> bool {
    matches!(key, "location" | "locations" | "deleted" | "deleted_at")
        || key.starts_with("os_glance")
}

/// Base attributes: columns of their own, never removable.
pub const BASE: [&str; 17] = [
    "checksum",
    "created_at",
    "container_format",
    "disk_format",
    "id",
    "min_disk",
    "min_ram",
    "name",
    "size",
    "virtual_size",
    "status",
    "tags",
    "owner",
    "updated_at",
    "visibility",
    "protected",
    "os_hidden",
];

pub const DISK_FORMATS: [&str; 11] = [
    "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop",
];
pub const CONTAINER_FORMATS: [&str; 8] = [
    "ami",
    "ari",
    "aki",
    "bare",
    "ovf",
    "ova",
    "docker",
    "compressed",
];
pub const VISIBILITIES: [&str; 4] = ["community", "public", "private", "shared"];

/// `image_property_quota`, `image_tag_quota`.
pub const PROPERTY_QUOTA: usize = 128;
pub const TAG_QUOTA: usize = 128;
const MAX_INT: i64 = 2_147_483_647;

pub fn read_only(key: &str) -> GlanceError {
    GlanceError::forbidden(format!("Attribute '{key}' is read-only."))
}

pub fn reserved(key: &str) -> GlanceError {
    GlanceError::forbidden(format!("Attribute '{key}' is reserved."))
}

/// A schema violation, worded as Glance words them (jsonschema's first line).
pub fn schema_error(detail: impl AsRef<str>) -> GlanceError {
    GlanceError::bad_request(format!(
        "Provided object does not match schema 'image': {}",
        detail.as_ref()
    ))
}

fn py_repr(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

fn enum_error(v: &Value, allowed: &[&str], nullable: bool) -> GlanceError {
    let mut list: Vec<String> = Vec::new();
    if nullable {
        list.push("None".into());
    }
    list.extend(allowed.iter().map(|a| format!("'{a}'")));
    schema_error(format!(
        "{} is not one of [{}]",
        py_repr(v),
        list.join(", ")
    ))
}

fn type_error(v: &Value, ty: &str) -> GlanceError {
    schema_error(format!("{} is not of type {ty}", py_repr(v)))
}

const UUID_PATTERN: &str =
    "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){12}$";

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A typed value of a base attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseValue {
    Text(Option<String>),
    Bool(bool),
    Int(u64),
    Tags(Vec<String>),
}

/// Checks `value` for the base attribute `key` against the image schema.
pub fn base_value(key: &str, value: &Value) -> GlanceResult<BaseValue> {
    let text = |max: usize, nullable: bool| -> GlanceResult<BaseValue> {
        match value {
            Value::Null if nullable => Ok(BaseValue::Text(None)),
            Value::String(s) if s.chars().count() <= max => Ok(BaseValue::Text(Some(s.clone()))),
            Value::String(_) => Err(schema_error(format!("{} is too long", py_repr(value)))),
            _ => Err(type_error(
                value,
                if nullable {
                    "'null', 'string'"
                } else {
                    "'string'"
                },
            )),
        }
    };
    let one_of = |allowed: &[&str], nullable: bool| -> GlanceResult<BaseValue> {
        match value {
            Value::Null if nullable => Ok(BaseValue::Text(None)),
            Value::String(s) if allowed.contains(&s.as_str()) => {
                Ok(BaseValue::Text(Some(s.clone())))
            }
            _ => Err(enum_error(value, allowed, nullable)),
        }
    };
    match key {
        "name" | "owner" => text(255, true),
        "visibility" => one_of(&VISIBILITIES, false),
        "disk_format" => one_of(&DISK_FORMATS, true),
        "container_format" => one_of(&CONTAINER_FORMATS, true),
        "protected" | "os_hidden" => match value {
            Value::Bool(b) => Ok(BaseValue::Bool(*b)),
            _ => Err(type_error(value, "'boolean'")),
        },
        "min_ram" | "min_disk" => match value.as_i64() {
            Some(n) if n < 0 => Err(GlanceError::bad_request(format!(
                "Invalid value '{n}' for parameter '{key}': Cannot be a negative value"
            ))),
            Some(n) if n > MAX_INT => Err(GlanceError::bad_request(format!(
                "'{key}' value out of range, must not exceed {MAX_INT}."
            ))),
            Some(n) => Ok(BaseValue::Int(n as u64)),
            None => Err(type_error(value, "'integer'")),
        },
        "tags" => {
            let Value::Array(items) = value else {
                return Err(type_error(value, "'array'"));
            };
            let mut tags: Vec<String> = Vec::new();
            for t in items {
                match t {
                    Value::String(s) if s.chars().count() <= 255 => {
                        if !tags.contains(s) {
                            tags.push(s.clone());
                        }
                    }
                    Value::String(_) => {
                        return Err(schema_error(format!("{} is too long", py_repr(t))));
                    }
                    _ => return Err(type_error(t, "'string'")),
                }
            }
            Ok(BaseValue::Tags(tags))
        }
        _ => Err(schema_error(format!("'{key}' is not a writable attribute"))),
    }
}

/// Checks an extra property's value (a string; the schema's known properties by their own
/// rules), then the StarlingX rules. Returns the value to store.
pub fn extra_value(key: &str, value: &Value) -> GlanceResult<String> {
    if key.chars().count() > 255 {
        return Err(GlanceError::bad_request(
            "Custom property should not be greater than 255 characters.",
        ));
    }
    let s = match (key, value) {
        ("kernel_id" | "ramdisk_id", Value::Null) => String::new(),
        (_, Value::String(s)) => s.clone(),
        _ => return Err(type_error(value, "'string'")),
    };
    match key {
        "kernel_id" | "ramdisk_id" if !s.is_empty() && !is_uuid(&s) => {
            return Err(schema_error(format!(
                "'{s}' does not match '{UUID_PATTERN}'"
            )));
        }
        "cinder_encryption_key_deletion_policy"
            if !matches!(s.as_str(), "on_image_deletion" | "do_not_delete") =>
        {
            return Err(enum_error(
                value,
                &["on_image_deletion", "do_not_delete"],
                false,
            ));
        }
        _ => {}
    }
    starlingx(key, &s)
}

/// stx-glance's `_validate_image_properties`: checked only for a non-empty value;
/// `sw_wrs_auto_recovery` is normalised to "True"/"False".
pub fn starlingx(key: &str, value: &str) -> GlanceResult<String> {
    if value.is_empty() {
        return Ok(value.to_owned());
    }
    match key {
        "hw_wrs_live_migration_max_downtime" => match value.trim().parse::<i64>() {
            Ok(n) if n >= 100 => Ok(value.to_owned()),
            _ => Err(GlanceError::bad_request(format!(
                "hw_wrs_live_migration_max_downtime must be a number greater than or equal to 100, value: {value}"
            ))),
        },
        "hw_wrs_live_migration_timeout" => match value.trim().parse::<i64>() {
            Ok(n) if n == 0 || (120..=800).contains(&n) => Ok(value.to_owned()),
            _ => Err(GlanceError::bad_request(format!(
                "hw_wrs_live_migration_timeout must be a number between 120 and 800 or 0, value: {value}"
            ))),
        },
        "sw_wrs_auto_recovery" => match value.to_ascii_lowercase().as_str() {
            "true" => Ok("True".into()),
            "false" => Ok("False".into()),
            _ => Err(GlanceError::bad_request(format!(
                "sw_wrs_auto_recovery must be True or False, value: {value}"
            ))),
        },
        _ => Ok(value.to_owned()),
    }
}

/// Counted against `image_property_quota` (Glance leaves its own namespace out).
pub fn counted_properties<'a>(keys: impl Iterator<Item = &'a String>) -> usize {
    keys.filter(|k| !k.starts_with("os_glance")).count()
}

pub fn property_quota(attempted: usize) -> GlanceError {
    GlanceError::new(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "The limit has been exceeded on the number of allowed image properties. Attempted: {attempted}, Maximum: {PROPERTY_QUOTA}"
        ),
    )
}

pub fn tag_quota(attempted: usize) -> GlanceError {
    GlanceError::new(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "The limit has been exceeded on the number of allowed image tags. Attempted: {attempted}, Maximum: {TAG_QUOTA}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn starlingx_rules_and_messages() {
        for ok in ["0", "120", "800", "400"] {
            assert_eq!(
                extra_value("hw_wrs_live_migration_timeout", &json!(ok)).unwrap(),
                ok
            );
        }
        for bad in ["1", "119", "801", "abc", "-5"] {
            assert_eq!(
                extra_value("hw_wrs_live_migration_timeout", &json!(bad))
                    .unwrap_err()
                    .explanation,
                format!(
                    "hw_wrs_live_migration_timeout must be a number between 120 and 800 or 0, value: {bad}"
                )
            );
        }
        assert_eq!(
            extra_value("hw_wrs_live_migration_max_downtime", &json!("100")).unwrap(),
            "100"
        );
        assert_eq!(
            extra_value("hw_wrs_live_migration_max_downtime", &json!("99"))
                .unwrap_err()
                .explanation,
            "hw_wrs_live_migration_max_downtime must be a number greater than or equal to 100, value: 99"
        );
        assert_eq!(
            extra_value("sw_wrs_auto_recovery", &json!("tRuE")).unwrap(),
            "True"
        );
        assert_eq!(
            extra_value("sw_wrs_auto_recovery", &json!("FALSE")).unwrap(),
            "False"
        );
        assert_eq!(
            extra_value("sw_wrs_auto_recovery", &json!("yes"))
                .unwrap_err()
                .explanation,
            "sw_wrs_auto_recovery must be True or False, value: yes"
        );
        // An empty value is not checked (stx-glance tests truthiness).
        assert_eq!(
            extra_value("hw_wrs_live_migration_timeout", &json!("")).unwrap(),
            ""
        );
        // StarlingX values are strings, like every extra property.
        assert!(
            extra_value("hw_wrs_live_migration_timeout", &json!(400))
                .unwrap_err()
                .explanation
                .starts_with(
                    "Provided object does not match schema 'image': 400 is not of type 'string'"
                )
        );
    }

    #[test]
    fn base_values_follow_the_schema() {
        assert_eq!(
            base_value("visibility", &json!("community")).unwrap(),
            BaseValue::Text(Some("community".into()))
        );
        assert!(
            base_value("visibility", &json!("world"))
                .unwrap_err()
                .explanation
                .contains("is not one of")
        );
        assert_eq!(
            base_value("disk_format", &json!(null)).unwrap(),
            BaseValue::Text(None)
        );
        assert_eq!(
            base_value("min_disk", &json!(-1)).unwrap_err().explanation,
            "Invalid value '-1' for parameter 'min_disk': Cannot be a negative value"
        );
        assert_eq!(
            base_value("tags", &json!(["a", "a", "b"])).unwrap(),
            BaseValue::Tags(vec!["a".into(), "b".into()])
        );
        assert!(base_value("name", &json!("x".repeat(256))).is_err());
        assert!(
            is_reserved("os_glance_x") && is_reserved("locations") && !is_reserved("os_distro")
        );
        assert!(extra_value("kernel_id", &json!("nope")).is_err());
    }
}
