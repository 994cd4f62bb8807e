//! `POST /volumes/{id}/action`: cinder's volume actions that fit cairn's one volume model.

use axum::{
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{Ctx, UPLOAD_IMAGE_PARAMS};
use crate::compute::volumes::parse_size;
use crate::compute::{Fault, body_or_fault, fault::FaultResult, json_body};
use crate::{
    AppState,
    model::{VolumeFlags, VolumeStatus, VolumeUpload},
    schema::{BadRequest, Forbidden, ItemNotFound, OverLimit},
};

/// One action per request, named by its key. The actions cairn takes:
///
/// - `os-extend` `{"new_size": N}` (GiB, larger than now): 202. Available or in-use (cinder
///   needs 3.42 for in-use; cairn grows online at any version); NBD clients see the new size
///   when they reconnect.
/// - `os-set_bootable` `{"bootable": true}`: 200.
/// - `os-update_readonly_flag` `{"readonly": true}`: 202; the NBD export is then read-only
///   from the next connection on.
/// - `os-reset_status` `{"status": "available"}` (admins): 202, any status.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the bodies `parse` checks
pub(crate) struct VolumeActionRequest {
    #[serde(rename = "os-volume_upload_image")]
    upload_image: Option<UploadImageAction>,
    #[serde(rename = "os-extend")]
    extend: Option<ExtendAction>,
    #[serde(rename = "os-set_bootable")]
    set_bootable: Option<BootableAction>,
    #[serde(rename = "os-update_readonly_flag")]
    update_readonly_flag: Option<ReadonlyAction>,
    #[serde(rename = "os-reset_status")]
    reset_status: Option<ResetStatusAction>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct ExtendAction {
    /// GiB, more than the volume's size now.
    #[schema(minimum = 1)]
    new_size: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct BootableAction {
    /// A boolean, or "true"/"false" (cinder's `strutils.bool_from_string`, strict).
    bootable: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct ReadonlyAction {
    readonly: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct ResetStatusAction {
    /// creating, available, attaching, in-use, detaching, deleting, error, uploading or
    /// downloading.
    status: String,
    /// Taken and ignored (cairn derives it from the attachments).
    attach_status: Option<String>,
    migration_status: Option<String>,
}

/// `os-volume_upload_image` (seed 003; `visibility` and `protected` from microversion 3.1 on,
/// refused as unexpected before).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct UploadImageAction {
    /// 1 to 255 characters.
    #[schema(min_length = 1, max_length = 255)]
    image_name: String,
    /// Upload an in-use volume (a point-in-time copy): a boolean, or a string ("true", ...).
    force: Option<bool>,
    /// `raw` (default) or `qcow2` (written in stream order: holes cost nothing); `iso` is
    /// accepted and makes no image (seed 003); vmdk and vdi are refused until their writers
    /// land.
    disk_format: Option<String>,
    /// bare (default), ovf, ami, aki or ari.
    container_format: Option<String>,
    /// 3.1 on: the image's visibility, `private` by default; `public` needs admin
    /// (`volume_extension:volume_actions:upload_public`).
    visibility: Option<UploadVisibility>,
    /// 3.1 on: the image's `protected` (default false): a boolean, or one of cinder's boolean
    /// words ("True", "false", "1", "no", ...).
    protected: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum UploadVisibility {
    Community,
    Public,
    Private,
    Shared,
}

/// The answer to `os-volume_upload_image`, as seed 003 shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UploadImageResult {
    id: String,
    /// `YYYY-MM-DDTHH:MM:SS.ffffff`
    updated_at: String,
    /// `uploading` (or the volume's status for `iso`).
    status: String,
    display_description: Option<String>,
    /// GiB.
    size: u64,
    volume_type: Option<String>,
    /// The new image (null for `iso`: no image is made).
    image_id: Option<String>,
    container_format: String,
    disk_format: String,
    image_name: String,
    /// The image's visibility (absent for `iso`: no image).
    #[serde(skip_serializing_if = "Option::is_none")]
    visibility: Option<String>,
    /// The image's `protected` (absent for `iso`).
    #[serde(skip_serializing_if = "Option::is_none")]
    protected: Option<bool>,
}

/// `{"os-volume_upload_image": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UploadImageResponse {
    #[serde(rename = "os-volume_upload_image")]
    upload: UploadImageResult,
}

enum Action {
    Upload(VolumeUpload),
    Extend(u64),
    Flags(VolumeFlags),
    Reset(VolumeStatus),
}

/// A strict boolean: JSON true/false, or the strings cinder's strict parser takes.
fn boolean(v: Option<&Value>, what: &str) -> FaultResult<bool> {
    match v {
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "y" | "on" | "t" => Ok(true),
            "false" | "0" | "no" | "n" | "off" | "f" => Ok(false),
            _ => Err(Fault::bad_request(format!(
                "Invalid value '{s}' for {what}: must be a boolean."
            ))),
        },
        Some(other) => Err(Fault::bad_request(format!(
            "Invalid value '{other}' for {what}: must be a boolean."
        ))),
        None => Err(Fault::bad_request(format!(
            "Invalid input for field/attribute {what}. Value: '{what}' is a required property"
        ))),
    }
}

/// A JSON value as Python shows it in a jsonschema message (`None`, `True`, `'text'`).
fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    }
}

/// cinder's `parameter_types.boolean`: a JSON boolean or one of these exact words.
const TRUE_WORDS: [&str; 12] = [
    "True", "TRUE", "true", "1", "ON", "On", "on", "YES", "Yes", "yes", "y", "t",
];
const FALSE_WORDS: [&str; 12] = [
    "False", "FALSE", "false", "0", "OFF", "Off", "off", "NO", "No", "no", "n", "f",
];

/// The 3.1 fields (cinder's `volume_upload_image_v31` schema): (visibility, protected), with
/// upstream's defaults `private` and false.
fn parse_upload_v31(args: &Map<String, Value>) -> FaultResult<(String, bool)> {
    let invalid = |field: &str, v: &Value, why: String| {
        let shown = match v {
            Value::String(s) => s.clone(),
            other => py_repr(other),
        };
        Fault::bad_request(format!(
            "Invalid input for field/attribute {field}. Value: {shown}. {why}"
        ))
    };
    let visibility = match args.get("visibility") {
        None => "private".to_owned(),
        Some(Value::String(s))
            if matches!(s.as_str(), "community" | "public" | "private" | "shared") =>
        {
            s.clone()
        }
        Some(v @ Value::String(_)) => {
            return Err(invalid(
                "visibility",
                v,
                format!(
                    "{} is not one of ['community', 'public', 'private', 'shared']",
                    py_repr(v)
                ),
            ));
        }
        Some(v) => {
            return Err(invalid(
                "visibility",
                v,
                format!("{} is not of type 'string'", py_repr(v)),
            ));
        }
    };
    let protected = match args.get("protected") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if TRUE_WORDS.contains(&s.as_str()) => true,
        Some(Value::String(s)) if FALSE_WORDS.contains(&s.as_str()) => false,
        Some(v @ Value::String(_)) => {
            let quoted = |w: &[&str]| {
                w.iter()
                    .map(|w| format!("'{w}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(invalid(
                "protected",
                v,
                format!(
                    "{} is not one of [True, {}, False, {}]",
                    py_repr(v),
                    quoted(&TRUE_WORDS),
                    quoted(&FALSE_WORDS)
                ),
            ));
        }
        Some(v) => {
            return Err(invalid(
                "protected",
                v,
                format!("{} is not of type 'boolean', 'string'", py_repr(v)),
            ));
        }
    };
    Ok((visibility, protected))
}

/// seed 003's request table, in cinder's order: image name, then force, then the formats;
/// then, from 3.1 on, visibility and protected (before 3.1 they are unexpected keys, as
/// cinder's 3.0 schema has them).
fn parse_upload(args: &Map<String, Value>, version: (u32, u32)) -> FaultResult<VolumeUpload> {
    let image_name = match args.get("image_name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_) | Value::Null | Value::Bool(false)) | None => {
            return Err(Fault::bad_request(
                "No image_name was specified in request.",
            ));
        }
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => {
            return Err(Fault::bad_request(
                "No image_name was specified in request.",
            ));
        }
        Some(_) => {
            return Err(Fault::bad_request(
                "Invalid input for field/attribute image_name. Value: not a string",
            ));
        }
    };
    if image_name.chars().count() > 255 {
        return Err(Fault::bad_request(
            "Invalid input for field/attribute image_name. Value: is longer than 255 characters",
        ));
    }
    let force = match args.get("force") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        // cinder's non-strict `bool_from_string`: anything but a true word is false.
        Some(Value::String(s)) => matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "y" | "on" | "t"
        ),
        Some(_) => return Err(Fault::bad_request("'force' is not string or bool.")),
    };
    let text = |key: &str, default: &str| match args.get(key) {
        None | Some(Value::Null) => Ok(default.to_owned()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Fault::bad_request(format!(
            "Invalid input for field/attribute {key}. Value: not a string"
        ))),
    };
    let container_format = text("container_format", "bare")?;
    if !matches!(
        container_format.as_str(),
        "bare" | "ovf" | "ami" | "aki" | "ari"
    ) {
        return Err(Fault::bad_request(format!(
            "Invalid input received: container_format {container_format} is not one of bare, ovf, ami, aki, ari."
        )));
    }
    let disk_format = text("disk_format", "raw")?;
    match disk_format.as_str() {
        "raw" | "qcow2" | "iso" => {}
        "vmdk" | "vdi" => {
            return Err(Fault::bad_request(format!(
                "Invalid input received: uploading as {disk_format} is not supported yet; raw and qcow2 are."
            )));
        }
        _ => {
            return Err(Fault::bad_request(format!(
                "Invalid input received: disk_format {disk_format} is not one of raw, vmdk, vdi, qcow2."
            )));
        }
    }
    let (visibility, protected) = if version >= UPLOAD_IMAGE_PARAMS {
        let (v, p) = parse_upload_v31(args)?;
        (Some(v), Some(p))
    } else {
        if let Some(k) = ["visibility", "protected"]
            .into_iter()
            .find(|k| args.contains_key(*k))
        {
            return Err(Fault::bad_request(format!(
                "Invalid input for field/attribute os-volume_upload_image. Value: Additional properties are not allowed ('{k}' was unexpected)"
            )));
        }
        (None, None)
    };
    Ok(VolumeUpload {
        image_name,
        force,
        disk_format,
        container_format,
        visibility,
        protected,
        request_id: None,
    })
}

fn parse(body: Map<String, Value>, version: (u32, u32)) -> FaultResult<Action> {
    let mut keys = body.keys();
    let (Some(name), None) = (keys.next(), keys.next()) else {
        return Err(Fault::bad_request(
            "Malformed request body: exactly one action is expected.",
        ));
    };
    let args = match &body[name] {
        Value::Object(m) => m.clone(),
        Value::Null => Map::new(),
        _ => {
            return Err(Fault::bad_request(format!(
                "Malformed request body: {name} must be an object."
            )));
        }
    };
    match name.as_str() {
        "os-volume_upload_image" => Ok(Action::Upload(parse_upload(&args, version)?)),
        "os-extend" => {
            let size = parse_size(args.get("new_size")).map_err(|f| {
                Fault::bad_request(
                    f.message
                        .replace("'size'", "'new_size'")
                        .replace("attribute size", "attribute new_size"),
                )
            })?;
            Ok(Action::Extend(size))
        }
        "os-set_bootable" => Ok(Action::Flags(VolumeFlags {
            bootable: Some(boolean(args.get("bootable"), "bootable")?),
            readonly: None,
        })),
        "os-update_readonly_flag" => Ok(Action::Flags(VolumeFlags {
            bootable: None,
            readonly: Some(boolean(args.get("readonly"), "readonly")?),
        })),
        "os-reset_status" => {
            let status = match args.get("status") {
                Some(Value::String(s)) => VolumeStatus::parse(s).ok_or_else(|| {
                    Fault::bad_request(format!("Invalid input received: Invalid status: {s}"))
                })?,
                Some(_) => {
                    return Err(Fault::bad_request(
                        "Invalid input for field/attribute status. Value: not a string",
                    ));
                }
                None => {
                    return Err(Fault::bad_request(
                        "Must specify 'status', 'attach_status' or 'migration_status' for update.",
                    ));
                }
            };
            Ok(Action::Reset(status))
        }
        other => Err(Fault::bad_request(format!(
            "There is no such action: {other}"
        ))),
    }
}

#[utoipa::path(post, path = "/{tenant_id}/volumes/{volume_id}/action", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id")),
    request_body(content = VolumeActionRequest, content_type = "application/json",
        description = "exactly one of the actions"),
    responses((status = 200, description = "os-set_bootable: done (empty body)"),
              (status = 202, description = "os-volume_upload_image: the volume, now uploading, and the new image (a failure after this is a user message, `/messages`); os-extend, os-update_readonly_flag, os-reset_status: done (empty body)", body = UploadImageResponse),
              (status = 400, description = "badRequest: no such action, bad arguments (visibility or protected below 3.1), a size not larger, a status that does not allow it", body = BadRequest),
              (status = 403, description = "forbidden: reader role, os-reset_status by a non-admin, or a public image by a non-admin", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound),
              (status = 413, description = "overLimit: no room in the store to grow", body = OverLimit)))]
pub(super) async fn volume_action(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    let body = json_body(&headers, &body_or_fault(body)?)?;
    let action = parse(body, ctx.version)?;
    let id = ctx.param("volume_id");
    let svc = &state.service;
    match action {
        Action::Upload(mut req) => {
            req.request_id = Some(ctx.request_id.clone());
            let (image_name, disk_format, container_format) = (
                req.image_name.clone(),
                req.disk_format.clone(),
                req.container_format.clone(),
            );
            let done = svc.upload_volume_to_image(&ctx.caller, id, req).await?;
            let v = done.volume;
            Ok((
                StatusCode::ACCEPTED,
                axum::Json(UploadImageResponse {
                    upload: UploadImageResult {
                        id: v.id,
                        updated_at: crate::time_fmt::compute(v.updated_at),
                        status: v.status.as_str().to_owned(),
                        display_description: v.description,
                        size: v.size_gib,
                        volume_type: v.volume_type,
                        image_id: done.image_id,
                        container_format,
                        disk_format,
                        image_name,
                        visibility: done.visibility,
                        protected: done.protected,
                    },
                }),
            )
                .into_response())
        }
        Action::Extend(size) => {
            ctx.require_writer("volume:extend")?;
            svc.extend_volume(&ctx.caller, id, size).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        Action::Flags(flags) => {
            ctx.require_writer("volume:update")?;
            svc.set_volume_flags(&ctx.caller, id, flags).await?;
            Ok(if flags.bootable.is_some() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            }
            .into_response())
        }
        Action::Reset(status) => {
            if !ctx.caller.is_admin() {
                return Err(Fault::forbidden(
                    "Policy doesn't allow volume_extension:volume_admin_actions:reset_status to be performed.",
                ));
            }
            svc.reset_volume_status(&ctx.caller, id, status).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn parse3(b: Map<String, Value>) -> FaultResult<Action> {
        parse(b, (3, 0))
    }

    fn upload(args: Value, version: (u32, u32)) -> FaultResult<VolumeUpload> {
        match parse(
            body(serde_json::json!({ "os-volume_upload_image": args })),
            version,
        )? {
            Action::Upload(u) => Ok(u),
            _ => unreachable!(),
        }
    }

    #[test]
    fn upload_takes_visibility_and_protected_from_3_1() {
        use serde_json::json;
        // 3.0: unexpected keys; absent, nothing is asked of the image service.
        let e = upload(json!({"image_name": "i", "visibility": "public"}), (3, 0)).unwrap_err();
        assert_eq!(
            e.message,
            "Invalid input for field/attribute os-volume_upload_image. Value: Additional properties are not allowed ('visibility' was unexpected)"
        );
        assert!(upload(json!({"image_name": "i", "protected": true}), (3, 0)).is_err());
        let u = upload(json!({"image_name": "i"}), (3, 0)).unwrap();
        assert_eq!((u.visibility, u.protected), (None, None));
        // 3.1: upstream's defaults, its enum and its boolean words (case as listed).
        let u = upload(json!({"image_name": "i"}), (3, 1)).unwrap();
        assert_eq!(
            (u.visibility.as_deref(), u.protected),
            (Some("private"), Some(false))
        );
        for (p, want) in [
            (json!(true), true),
            (json!("True"), true),
            (json!("y"), true),
            (json!("f"), false),
            (json!("OFF"), false),
            (json!(false), false),
        ] {
            let u = upload(
                json!({"image_name": "i", "visibility": "community", "protected": p}),
                (3, 3),
            )
            .unwrap();
            assert_eq!(
                (u.visibility.as_deref(), u.protected),
                (Some("community"), Some(want))
            );
        }
        let e = upload(json!({"image_name": "i", "visibility": "everyone"}), (3, 1)).unwrap_err();
        assert_eq!(
            e.message,
            "Invalid input for field/attribute visibility. Value: everyone. 'everyone' is not one of ['community', 'public', 'private', 'shared']"
        );
        let e = upload(json!({"image_name": "i", "visibility": null}), (3, 1)).unwrap_err();
        assert_eq!(
            e.message,
            "Invalid input for field/attribute visibility. Value: None. None is not of type 'string'"
        );
        let e = upload(json!({"image_name": "i", "protected": "tRUE"}), (3, 1)).unwrap_err();
        assert!(
            e.message.starts_with(
                "Invalid input for field/attribute protected. Value: tRUE. 'tRUE' is not one of [True, 'True', 'TRUE', 'true', '1',"
            ) && e.message.ends_with("'no', 'n', 'f']"),
            "{}",
            e.message
        );
        let e = upload(json!({"image_name": "i", "protected": 1}), (3, 1)).unwrap_err();
        assert_eq!(
            e.message,
            "Invalid input for field/attribute protected. Value: 1. 1 is not of type 'boolean', 'string'"
        );
    }

    #[test]
    fn actions_and_their_argument_errors() {
        use serde_json::json;
        assert!(matches!(
            parse3(body(json!({"os-extend": {"new_size": 3}}))),
            Ok(Action::Extend(3))
        ));
        assert!(matches!(
            parse3(body(json!({"os-extend": {"new_size": "4"}}))),
            Ok(Action::Extend(4))
        ));
        assert!(parse3(body(json!({"os-extend": {}}))).is_err());
        assert!(parse3(body(json!({"os-extend": {"new_size": 0}}))).is_err());
        assert!(matches!(
            parse3(body(json!({"os-set_bootable": {"bootable": "True"}}))),
            Ok(Action::Flags(VolumeFlags {
                bootable: Some(true),
                readonly: None
            }))
        ));
        assert!(parse3(body(json!({"os-set_bootable": {"bootable": "maybe"}}))).is_err());
        assert!(parse3(body(json!({"os-update_readonly_flag": {"readonly": 1}}))).is_err());
        assert!(matches!(
            parse3(body(json!({"os-reset_status": {"status": "error"}}))),
            Ok(Action::Reset(VolumeStatus::Error))
        ));
        assert!(parse3(body(json!({"os-reset_status": {"status": "bogus"}}))).is_err());
        let e = parse3(body(json!({"os-frobnicate": {}}))).err().unwrap();
        assert_eq!(e.message, "There is no such action: os-frobnicate");
        assert!(parse3(body(json!({}))).is_err());
        assert!(
            parse3(body(
                json!({"os-extend": {"new_size": 2}, "os-set_bootable": {}})
            ))
            .is_err()
        );
    }
}
