//! `POST /volumes/{id}/action`: cinder's volume actions that fit cairn's one volume model.

use axum::{
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{Ctx, UPLOAD_IMAGE_PARAMS};
use crate::compute::volumes::{invalid, parse_size};
use crate::compute::{Fault, body_or_fault, fault::FaultResult, json_body};
use crate::{
    AppState,
    model::{AttachStep, VolumeAttach, VolumeFlags, VolumeStatus, VolumeUpload},
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
///
/// The legacy attach flow, on the attachments Compute makes and lists:
///
/// - `os-reserve` (available, or in-use for multi-attach -> attaching), `os-unreserve`
///   (attaching -> in-use if attached, else available), `os-begin_detaching` (in-use ->
///   detaching), `os-roll_detaching` (detaching -> in-use): 202; the value is not read.
/// - `os-attach` `{"instance_uuid": ..., "mountpoint": "/dev/vdc", "mode": "rw"}`: 202; the
///   server must exist (404 otherwise); `host_name` alone is 400 (cairn attaches to servers).
/// - `os-detach` `{"attachment_id": ...}` (optional when there is one attachment): 202, once
///   the export of a last attachment no longer reaches the store.
/// - `os-initialize_connection` `{"connector": {...}}`: 200, where the NBD export is served.
/// - `os-terminate_connection` `{"connector": {...}}`: 202 (unreserves an attaching volume).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the bodies `parse` checks
pub(crate) struct VolumeActionRequest {
    #[serde(rename = "os-reserve")]
    reserve: Option<NoArguments>,
    #[serde(rename = "os-unreserve")]
    unreserve: Option<NoArguments>,
    #[serde(rename = "os-begin_detaching")]
    begin_detaching: Option<NoArguments>,
    #[serde(rename = "os-roll_detaching")]
    roll_detaching: Option<NoArguments>,
    #[serde(rename = "os-attach")]
    attach: Option<AttachAction>,
    #[serde(rename = "os-detach")]
    detach: Option<DetachAction>,
    #[serde(rename = "os-initialize_connection")]
    initialize_connection: Option<ConnectorAction>,
    #[serde(rename = "os-terminate_connection")]
    terminate_connection: Option<ConnectorAction>,
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

/// `null` or `{}`: cinder takes any value for these actions and reads none.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct NoArguments {}

/// `rw` (default) or `ro`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AttachMode {
    Rw,
    Ro,
}

/// `os-attach`: `mountpoint` and `instance_uuid` (or `host_name`), no other keys.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct AttachAction {
    /// A Compute server of the project (a UUID): 404 if cairn has no such server.
    #[schema(
        nullable = false,
        pattern = "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
    )]
    instance_uuid: Option<String>,
    /// The device on the server (`/dev/vdc`); another attachment's device there is 400.
    #[schema(min_length = 1, max_length = 255)]
    mountpoint: String,
    /// cinder's host attachment: taken beside `instance_uuid` (and not kept), 400 alone.
    #[schema(nullable = false, max_length = 255)]
    host_name: Option<String>,
    /// `ro` makes the attachment read-only (the export is read-only while no attachment
    /// writes); a volume flagged read-only takes only `ro`.
    #[schema(nullable = false)]
    mode: Option<AttachMode>,
}

/// `os-detach`: the attachment to end, or null for the volume's only one.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct DetachAction {
    /// An attachment of this volume (`attachments[].attachment_id`).
    #[schema(
        pattern = "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
    )]
    attachment_id: Option<String>,
}

/// `os-initialize_connection`, `os-terminate_connection`: the connecting host as os-brick
/// describes it (`host`, `ip`, `initiator`, ...; a string is taken too). cairn reads only
/// `enforce_multipath`, which it echoes.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct ConnectorAction {
    #[schema(value_type = Object)]
    connector: Value,
}

/// `data` of an `nbd` connection: the volume's NBD export.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NbdConnectionData {
    /// The NBD server's TCP address (the daemon's `--nbd`).
    host: String,
    port: u16,
    /// The export's name: the volume id.
    export_name: String,
    /// `nbd://host:port/<volume-id>`, as Compute's `nbdUri` (qemu, `nbdinfo`, `nbd-client`).
    uri: String,
    /// `ro` when the volume is flagged read-only, or every attachment is `ro`; else `rw`.
    access_mode: AttachMode,
    volume_id: String,
    encrypted: bool,
    /// The export takes TRIM and WRITE_ZEROES.
    discard: bool,
    /// cairn has no QoS: always null.
    qos_specs: Option<Map<String, Value>>,
    enforce_multipath: bool,
}

/// What `os-initialize_connection` returns under `connection_info`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConnectionInfo {
    /// `nbd`: the volume is served by the daemon's NBD server (no os-brick connector has
    /// that name; clients use `data.uri`).
    driver_volume_type: String,
    data: NbdConnectionData,
    /// The connector's `enforce_multipath` (false when absent), as cinder echoes it.
    enforce_multipath: bool,
}

/// `{"connection_info": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConnectionInfoResponse {
    connection_info: ConnectionInfo,
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
    Step(AttachStep),
    Attach(VolumeAttach),
    Detach(Option<String>),
    Connect { enforce_multipath: bool },
}

/// cinder's JSON-schema refusal of a key its action schema does not list.
fn only_keys(action: &str, args: &Map<String, Value>, allowed: &[&str]) -> FaultResult<()> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(invalid(
            action,
            &format!("Additional properties are not allowed ('{k}' was unexpected)"),
        )),
        None => Ok(()),
    }
}

/// A UUID-like string (cinder's `uuid` format, `uuidutils.is_uuid_like`), canonical.
fn uuid_field(key: &str, v: &Value) -> FaultResult<String> {
    match v {
        Value::String(s) => uuid::Uuid::parse_str(s)
            .map(|u| u.to_string())
            .map_err(|_| invalid(key, &format!("'{s}' is not a 'uuid'"))),
        _ => Err(invalid(key, "is not of type 'string'")),
    }
}

/// `os-attach`'s schema (cinder's `volume_actions.attach`).
fn parse_attach(args: &Map<String, Value>) -> FaultResult<VolumeAttach> {
    const NAME: &str = "os-attach";
    only_keys(
        NAME,
        args,
        &["instance_uuid", "mountpoint", "host_name", "mode"],
    )?;
    let mountpoint = match args.get("mountpoint") {
        None => return Err(invalid(NAME, "'mountpoint' is a required property")),
        Some(Value::String(s)) if (1..=255).contains(&s.chars().count()) => s.clone(),
        Some(Value::String(_)) => {
            return Err(invalid("mountpoint", "must be 1 to 255 characters long"));
        }
        Some(_) => return Err(invalid("mountpoint", "is not of type 'string'")),
    };
    let instance_uuid = args
        .get("instance_uuid")
        .map(|v| uuid_field("instance_uuid", v))
        .transpose()?;
    let host_name = match args.get("host_name") {
        None => None,
        Some(Value::String(s)) if s.chars().count() <= 255 => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(invalid("host_name", "is longer than 255 characters"));
        }
        Some(_) => return Err(invalid("host_name", "is not of type 'string'")),
    };
    if instance_uuid.is_none() && host_name.is_none() {
        return Err(invalid(
            NAME,
            "is not valid under any of the given schemas (instance_uuid or host_name is required)",
        ));
    }
    let read_only = match args.get("mode") {
        None => false,
        Some(Value::String(m)) if m == "rw" => false,
        Some(Value::String(m)) if m == "ro" => true,
        Some(other) => {
            return Err(invalid(
                "mode",
                &format!("{other} is not one of ['rw', 'ro']"),
            ));
        }
    };
    Ok(VolumeAttach {
        instance_uuid,
        host_name,
        mountpoint,
        read_only,
    })
}

/// `os-initialize_connection` / `os-terminate_connection`: a `connector` (an object or a
/// string; null too for terminate); returns its `enforce_multipath`.
fn parse_connector(name: &str, args: &Map<String, Value>, null_ok: bool) -> FaultResult<bool> {
    only_keys(name, args, &["connector"])?;
    match args.get("connector") {
        None => Err(invalid(name, "'connector' is a required property")),
        Some(Value::Object(c)) => match c.get("enforce_multipath") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(invalid("enforce_multipath", "is not of type 'boolean'")),
        },
        Some(Value::String(_)) => Ok(false),
        Some(Value::Null) if null_ok => Ok(false),
        Some(_) => Err(invalid(
            "connector",
            if null_ok {
                "is not of type 'string', 'object', 'null'"
            } else {
                "is not of type 'object', 'string'"
            },
        )),
    }
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
        "raw" | "qcow2" | "iso" | "vmdk" | "vdi" => {}
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
        token: None,
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
    // cinder's schemas for these take any value (cinderclient sends null) and read none.
    let step = match name.as_str() {
        "os-reserve" => Some(AttachStep::Reserve),
        "os-unreserve" => Some(AttachStep::Unreserve),
        "os-begin_detaching" => Some(AttachStep::BeginDetaching),
        "os-roll_detaching" => Some(AttachStep::RollDetaching),
        _ => None,
    };
    if let Some(step) = step {
        return Ok(Action::Step(step));
    }
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
        "os-attach" => Ok(Action::Attach(parse_attach(&args)?)),
        "os-detach" => {
            only_keys(name, &args, &["attachment_id"])?;
            let id = match args.get("attachment_id") {
                None | Some(Value::Null) => None,
                Some(v) => Some(uuid_field("attachment_id", v)?),
            };
            Ok(Action::Detach(id))
        }
        "os-initialize_connection" => Ok(Action::Connect {
            enforce_multipath: parse_connector(name, &args, false)?,
        }),
        "os-terminate_connection" => {
            parse_connector(name, &args, true)?;
            Ok(Action::Step(AttachStep::TerminateConnection))
        }
        other => Err(Fault::bad_request(format!(
            "There is no such action: {other}"
        ))),
    }
}

/// An action's empty answer, as cinder's, typed `text/plain`: the statuses it shares with
/// JSON answers (200 with os-initialize_connection, 202 with os-volume_upload_image) are then
/// told apart by type, and a JSON type would promise a JSON body.
fn empty(status: StatusCode) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "",
    )
        .into_response()
}

#[utoipa::path(post, path = "/{tenant_id}/volumes/{volume_id}/action", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id")),
    request_body(content = VolumeActionRequest, content_type = "application/json",
        description = "exactly one of the actions"),
    responses((status = 200, description = "os-initialize_connection: where the volume's NBD export is served (JSON); os-set_bootable: done (an empty text/plain body)",
                  content((ConnectionInfoResponse = "application/json"), (String = "text/plain"))),
              (status = 202, description = "os-volume_upload_image: the volume, now uploading, and the new image (JSON; a failure after this is a user message, `/messages`); os-extend, os-update_readonly_flag, os-reset_status, os-reserve, os-unreserve, os-attach, os-begin_detaching, os-roll_detaching, os-detach, os-terminate_connection: done (an empty text/plain body)",
                  content((UploadImageResponse = "application/json"), (String = "text/plain"))),
              (status = 400, description = "badRequest: no such action, bad arguments (visibility or protected below 3.1), a size not larger, a status that does not allow it, a read-write attach of a read-only volume, host_name without instance_uuid, a device in use on the server, an attachment id not of this volume", body = BadRequest),
              (status = 403, description = "forbidden: reader role, os-reset_status by a non-admin, or a public image by a non-admin", body = Forbidden),
              (status = 404, description = "itemNotFound: no such volume, or (os-attach) no such server", body = ItemNotFound),
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
            req.token = headers
                .get("x-auth-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
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
            Ok(empty(StatusCode::ACCEPTED))
        }
        Action::Flags(flags) => {
            ctx.require_writer("volume:update")?;
            svc.set_volume_flags(&ctx.caller, id, flags).await?;
            Ok(empty(if flags.bootable.is_some() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            }))
        }
        Action::Reset(status) => {
            if !ctx.caller.is_admin() {
                return Err(Fault::forbidden(
                    "Policy doesn't allow volume_extension:volume_admin_actions:reset_status to be performed.",
                ));
            }
            svc.reset_volume_status(&ctx.caller, id, status).await?;
            Ok(empty(StatusCode::ACCEPTED))
        }
        Action::Step(step) => {
            ctx.require_writer(step.policy())?;
            svc.volume_attach_step(&ctx.caller, id, step).await?;
            Ok(empty(StatusCode::ACCEPTED))
        }
        Action::Attach(req) => {
            ctx.require_writer("volume_extension:volume_actions:attach")?;
            svc.volume_attach(&ctx.caller, id, req).await?;
            Ok(empty(StatusCode::ACCEPTED))
        }
        Action::Detach(attachment_id) => {
            ctx.require_writer("volume_extension:volume_actions:detach")?;
            svc.volume_detach(&ctx.caller, id, attachment_id).await?;
            Ok(empty(StatusCode::ACCEPTED))
        }
        Action::Connect { enforce_multipath } => {
            ctx.require_writer("volume_extension:volume_actions:initialize_connection")?;
            let c = svc.volume_connection(&ctx.caller, id).await?;
            Ok(axum::Json(ConnectionInfoResponse {
                connection_info: ConnectionInfo {
                    driver_volume_type: "nbd".into(),
                    data: NbdConnectionData {
                        host: c.host,
                        port: c.port,
                        export_name: c.export_name,
                        uri: c.uri,
                        access_mode: if c.read_only {
                            AttachMode::Ro
                        } else {
                            AttachMode::Rw
                        },
                        volume_id: c.volume_id,
                        encrypted: false,
                        discard: true,
                        qos_specs: None,
                        enforce_multipath,
                    },
                    enforce_multipath,
                },
            })
            .into_response())
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
        // The attach flow: the status steps take any value, os-attach cinder's schema.
        for (name, step) in [
            ("os-reserve", AttachStep::Reserve),
            ("os-unreserve", AttachStep::Unreserve),
            ("os-begin_detaching", AttachStep::BeginDetaching),
            ("os-roll_detaching", AttachStep::RollDetaching),
        ] {
            for v in [json!(null), json!({}), json!("x")] {
                assert!(matches!(parse3(body(json!({name: v}))), Ok(Action::Step(s)) if s == step));
            }
        }
        let uuid = "6EDBC2F4150744F8AC0DEED1D2608D38";
        match parse3(body(
            json!({"os-attach": {"instance_uuid": uuid, "mountpoint": "/dev/vdc", "mode": "ro"}}),
        )) {
            Ok(Action::Attach(a)) => {
                assert_eq!(
                    a.instance_uuid.as_deref(),
                    Some("6edbc2f4-1507-44f8-ac0d-eed1d2608d38")
                );
                assert!(a.read_only && a.mountpoint == "/dev/vdc" && a.host_name.is_none());
            }
            _ => panic!("os-attach not parsed"),
        }
        assert!(matches!(
            parse3(body(
                json!({"os-attach": {"host_name": "h", "mountpoint": "/dev/vdc"}})
            )),
            Ok(Action::Attach(VolumeAttach {
                instance_uuid: None,
                read_only: false,
                ..
            }))
        ));
        for bad in [
            json!({"os-attach": {"mountpoint": "/dev/vdc"}}),
            json!({"os-attach": {"instance_uuid": uuid}}),
            json!({"os-attach": {"instance_uuid": uuid, "mountpoint": ""}}),
            json!({"os-attach": {"instance_uuid": "x", "mountpoint": "/dev/vdc"}}),
            json!({"os-attach": {"instance_uuid": null, "mountpoint": "/dev/vdc"}}),
            json!({"os-attach": {"instance_uuid": uuid, "mountpoint": "/dev/vdc", "mode": "wo"}}),
            json!({"os-attach": {"instance_uuid": uuid, "mountpoint": "/dev/vdc", "z": 1}}),
            json!({"os-attach": null}),
            json!({"os-detach": {"attachment_id": 3}}),
            json!({"os-detach": {"other": 3}}),
            json!({"os-initialize_connection": {"connector": null}}),
            json!({"os-initialize_connection": {"connector": {"enforce_multipath": "yes"}}}),
            json!({"os-terminate_connection": null}),
        ] {
            assert!(parse3(body(bad.clone())).is_err(), "{bad}");
        }
        assert!(matches!(
            parse3(body(json!({"os-detach": null}))),
            Ok(Action::Detach(None))
        ));
        assert!(matches!(
            parse3(body(json!({"os-detach": {"attachment_id": uuid}}))),
            Ok(Action::Detach(Some(_)))
        ));
        assert!(matches!(
            parse3(body(
                json!({"os-initialize_connection": {"connector": {"enforce_multipath": true}}})
            )),
            Ok(Action::Connect {
                enforce_multipath: true
            })
        ));
        assert!(matches!(
            parse3(body(
                json!({"os-terminate_connection": {"connector": null}})
            )),
            Ok(Action::Step(AttachStep::TerminateConnection))
        ));
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
