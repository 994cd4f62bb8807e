//! The JSON schemas Glance serves under `/v2/schemas`. Clients build their models from them
//! (glanceclient validates every image it sends and receives against `image`, and decides
//! between `add` and `replace` by `is_base`), so they describe exactly what cairn answers.
//! The enums come from the same tables the validators use.

use serde_json::{Map, Value, json};

use super::props::{CONTAINER_FORMATS, DISK_FORMATS, VISIBILITIES};

const UUID_PATTERN: &str =
    "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){12}$";

fn nullable_enum(values: &[&str]) -> Value {
    let mut v = vec![Value::Null];
    v.extend(values.iter().map(|s| json!(s)));
    Value::Array(v)
}

fn image_properties() -> Map<String, Value> {
    let props = json!({
        "id": {"type": "string", "description": "An identifier for the image", "pattern": UUID_PATTERN},
        "name": {"type": ["null", "string"], "description": "Descriptive name for the image", "maxLength": 255},
        "status": {"type": "string", "readOnly": true, "description": "Status of the image",
            "enum": ["queued", "saving", "active", "killed", "deleted", "uploading", "importing", "pending_delete", "deactivated"]},
        "visibility": {"type": "string", "description": "Scope of image accessibility", "enum": VISIBILITIES},
        "protected": {"type": "boolean", "description": "If true, image will not be deletable."},
        "os_hidden": {"type": "boolean", "description": "If true, image will not appear in default image list response."},
        "checksum": {"type": ["null", "string"], "readOnly": true, "description": "md5 hash of image contents.", "maxLength": 32},
        "os_hash_algo": {"type": ["null", "string"], "readOnly": true, "description": "Algorithm to calculate the os_hash_value", "maxLength": 64},
        "os_hash_value": {"type": ["null", "string"], "readOnly": true, "description": "Hexdigest of the image contents using the algorithm specified by the os_hash_algo", "maxLength": 128},
        "owner": {"type": ["null", "string"], "description": "Owner of the image", "maxLength": 255},
        "size": {"type": ["null", "integer"], "readOnly": true, "description": "Size of image file in bytes"},
        "virtual_size": {"type": ["null", "integer"], "readOnly": true, "description": "Virtual size of image in bytes"},
        "container_format": {"type": ["null", "string"], "description": "Format of the container", "enum": nullable_enum(&CONTAINER_FORMATS)},
        "disk_format": {"type": ["null", "string"], "description": "Format of the disk", "enum": nullable_enum(&DISK_FORMATS)},
        "created_at": {"type": "string", "readOnly": true, "description": "Date and time of image registration"},
        "updated_at": {"type": "string", "readOnly": true, "description": "Date and time of the last image modification"},
        "tags": {"type": "array", "description": "List of strings related to the image", "items": {"type": "string", "maxLength": 255}},
        "direct_url": {"type": "string", "readOnly": true, "description": "URL to access the image file kept in external store"},
        "min_ram": {"type": "integer", "description": "Amount of ram (in MB) required to boot image."},
        "min_disk": {"type": "integer", "description": "Amount of disk space (in GB) required to boot image."},
        "self": {"type": "string", "readOnly": true, "description": "An image self url"},
        "file": {"type": "string", "readOnly": true, "description": "An image file url"},
        "stores": {"type": "string", "readOnly": true, "description": "Store in which image data resides.  Only present when the operator has enabled multiple stores.  May be a comma-separated list of store identifiers."},
        "schema": {"type": "string", "readOnly": true, "description": "An image schema url"},
        "locations": {"type": "array", "description": "A set of URLs to access the image file kept in external store",
            "items": {"type": "object", "required": ["url", "metadata"], "properties": {
                "url": {"type": "string", "maxLength": 255},
                "metadata": {"type": "object"}}}},
        // Glance's stock custom properties (`schema-image.json`): not base, so clients
        // `add` them.
        "kernel_id": {"type": ["null", "string"], "pattern": UUID_PATTERN, "is_base": false,
            "description": "ID of image stored in Glance that should be used as the kernel when booting an AMI-style image."},
        "ramdisk_id": {"type": ["null", "string"], "pattern": UUID_PATTERN, "is_base": false,
            "description": "ID of image stored in Glance that should be used as the ramdisk when booting an AMI-style image."},
        "instance_uuid": {"type": "string", "is_base": false,
            "description": "Metadata which can be used to record which instance this image is associated with. (Informational only, does not create an instance snapshot.)"},
        "architecture": {"type": "string", "is_base": false,
            "description": "Operating system architecture as specified in https://docs.openstack.org/python-glanceclient/latest/cli/property-keys.html"},
        "os_distro": {"type": "string", "is_base": false,
            "description": "Common name of operating system distribution as specified in https://docs.openstack.org/python-glanceclient/latest/cli/property-keys.html"},
        "os_version": {"type": "string", "is_base": false,
            "description": "Operating system version as specified by the distributor."},
        "description": {"type": "string", "is_base": false,
            "description": "A human-readable string describing this image."},
        "cinder_encryption_key_id": {"type": "string", "is_base": false,
            "description": "Identifier in the OpenStack Key Management Service for the encryption key for the Block Storage Service to use when mounting a volume created from this image"},
        "cinder_encryption_key_deletion_policy": {"type": "string", "enum": ["on_image_deletion", "do_not_delete"], "is_base": false,
            "description": "States the condition under which the Image Service will delete the object associated with the 'cinder_encryption_key_id' image property.  If this property is missing, the Image Service will take no action"}
    });
    match props {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `GET /v2/schemas/image`
pub fn image() -> Value {
    json!({
        "name": "image",
        "properties": image_properties(),
        "additionalProperties": {"type": "string"},
        "links": [
            {"rel": "self", "href": "{self}"},
            {"rel": "enclosure", "href": "{file}"},
            {"rel": "describedby", "href": "{schema}"}
        ]
    })
}

/// `GET /v2/schemas/images`
pub fn images() -> Value {
    json!({
        "name": "images",
        "properties": {
            "images": {"type": "array", "items": image()},
            "first": {"type": "string"},
            "next": {"type": "string"},
            "schema": {"type": "string"}
        },
        "links": [
            {"rel": "first", "href": "{first}"},
            {"rel": "next", "href": "{next}"},
            {"rel": "describedby", "href": "{schema}"}
        ]
    })
}

/// `GET /v2/schemas/member`
pub fn member() -> Value {
    json!({
        "name": "member",
        "properties": {
            "created_at": {"type": "string", "description": "Date and time of image member creation"},
            "image_id": {"type": "string", "description": "An identifier for the image", "pattern": UUID_PATTERN},
            "member_id": {"type": "string", "description": "An identifier for the image member (tenantId)"},
            "schema": {"type": "string", "readOnly": true},
            "status": {"type": "string", "description": "The status of this image member", "enum": ["pending", "accepted", "rejected"]},
            "updated_at": {"type": "string", "description": "Date and time of last modification of image member"}
        }
    })
}

/// `GET /v2/schemas/members`
pub fn members() -> Value {
    json!({
        "name": "members",
        "properties": {
            "members": {"type": "array", "items": member()},
            "schema": {"type": "string"}
        },
        "links": [{"rel": "describedby", "href": "{schema}"}]
    })
}

/// `GET /v2/schemas/metadefs/namespace`: the namespace document's top level (cairn has no
/// metadata definitions; glanceclient only reads the schema at start-up).
pub fn metadefs_namespace() -> Value {
    json!({
        "name": "namespace",
        "required": ["namespace"],
        "additionalProperties": false,
        "properties": {
            "namespace": {"type": "string", "maxLength": 80, "description": "The unique namespace text."},
            "display_name": {"type": "string", "maxLength": 80, "description": "The user friendly name for the namespace. Used by UI if available."},
            "description": {"type": "string", "maxLength": 500, "description": "Provides a user friendly description of the namespace."},
            "visibility": {"type": "string", "enum": ["public", "private"], "description": "Scope of namespace accessibility."},
            "protected": {"type": "boolean", "description": "If true, namespace will not be deletable."},
            "owner": {"type": "string", "maxLength": 255, "description": "Owner of the namespace."},
            "created_at": {"type": "string", "readOnly": true, "format": "date-time", "description": "Date and time of namespace creation"},
            "updated_at": {"type": "string", "readOnly": true, "format": "date-time", "description": "Date and time of the last namespace modification"},
            "schema": {"type": "string", "readOnly": true},
            "self": {"type": "string", "readOnly": true},
            "resource_type_associations": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "prefix": {"type": "string"}, "properties_target": {"type": "string"}}}},
            "properties": {"type": "object"},
            "objects": {"type": "array", "items": {"type": "object"}},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}}
        }
    })
}

/// `GET /v2/schemas/metadefs/resource_type`
pub fn metadefs_resource_type() -> Value {
    json!({
        "name": "resource_type_association",
        "required": ["name"],
        "additionalProperties": false,
        "properties": {
            "name": {"type": "string", "maxLength": 80, "description": "Resource type names should be aligned with Heat resource types whenever possible: https://docs.openstack.org/heat/latest/template_guide/openstack.html"},
            "prefix": {"type": "string", "maxLength": 80, "description": "Specifies the prefix to use for the given resource type. Any properties in the namespace should be prefixed with this prefix when being applied to the specified resource type. Must include prefix separator (e.g. a colon :)."},
            "properties_target": {"type": "string", "maxLength": 80, "description": "Some resource types allow more than one key / value pair per instance.  For example, Cinder allows user and image metadata on volumes. Only the image properties metadata is evaluated by Nova (scheduling or drivers). This property allows a namespace target to remove the ambiguity."},
            "created_at": {"type": "string", "readOnly": true, "format": "date-time", "description": "Date and time of resource type association"},
            "updated_at": {"type": "string", "readOnly": true, "format": "date-time", "description": "Date and time of the last resource type association modification"}
        }
    })
}
