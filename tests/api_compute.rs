//! The Compute volumes extension (seed 000) on the real daemon over real HTTP: every route, every
//! error in the Compute fault format, tenant and role checks, microversions and version
//! documents, and python-novaclient's volume attachment calls.

mod common;

use std::{path::PathBuf, process::Command};

use common::{Cairn, Reply, Serve};
use serde_json::{Value, json};

const PW: &str = "compute-test-admin-pw";
const NO_SUCH: &str = "6edbc2f4-1507-44f8-ac0d-eed1d2608d38";

fn daemon() -> Cairn {
    Serve::new().arg("--admin-password").arg(PW).start()
}

/// `POST /v3/auth/tokens` with a password, scoped to `project`: (token, project id).
fn token(c: &Cairn, user: &str, password: &str, project: &str) -> (String, String) {
    common::password_token(
        c,
        user,
        password,
        json!({"name": project, "domain": {"name": "Default"}}),
    )
}

/// A caller of the Compute API: a token and the tenant id its URLs carry.
struct Api<'a> {
    c: &'a Cairn,
    token: String,
    tenant: String,
    prefix: &'static str,
}

impl<'a> Api<'a> {
    fn new(c: &'a Cairn, (token, tenant): (String, String)) -> Api<'a> {
        Api {
            c,
            token,
            tenant,
            prefix: "/v1.1",
        }
    }
    fn under(&self, prefix: &'static str) -> Api<'a> {
        Api {
            c: self.c,
            token: self.token.clone(),
            tenant: self.tenant.clone(),
            prefix,
        }
    }
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        self.c.request(
            method,
            &format!("{}/{}{path}", self.prefix, self.tenant),
            &[("x-auth-token", &self.token)],
            body.map(|b| ("application/json", b)),
        )
    }
    fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None)
    }
    fn post(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, Some(&body.to_string()))
    }
    fn delete(&self, path: &str) -> Reply {
        self.call("DELETE", path, None)
    }
}

/// Asserts status and JSON body; `Null` for an empty body.
fn ok(r: &Reply, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.body);
    if r.body.is_empty() {
        Value::Null
    } else {
        assert!(r.content_type.starts_with("application/json"), "{r:?}");
        r.json()
    }
}

/// Asserts a Compute fault (`{"<name>": {"message": ..., "code": <status>}}` and nothing else);
/// returns the message.
fn fault(r: &Reply, status: u16, name: &str) -> String {
    assert_eq!(r.status, status, "{}", r.body);
    assert!(r.content_type.starts_with("application/json"), "{r:?}");
    let v = r.json();
    let inner = v[name]
        .as_object()
        .unwrap_or_else(|| panic!("no {name} fault: {v}"));
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
    assert_eq!(inner.len(), 2, "{v}");
    assert_eq!(inner["code"], status, "{v}");
    inner["message"].as_str().expect("message").to_owned()
}

fn create_volume(api: &Api, body: Value) -> Value {
    ok(&api.post("/os-volumes", &body), 200)["volume"].clone()
}

fn create_server(api: &Api, name: &str) -> String {
    let s = ok(
        &api.post("/servers", &json!({"server": {"name": name}})),
        202,
    );
    s["server"]["id"].as_str().expect("server id").to_owned()
}

#[test]
fn extensions_and_volume_lifecycle_with_every_error() {
    let c = daemon();
    let api = Api::new(&c, token(&c, "admin", PW, "admin"));

    // Extensions: the 2011 descriptor byte for byte, under every prefix.
    let descriptor = r#"{"updated": "2011-03-25T00:00:00+00:00", "name": "Volumes", "links": [], "namespace": "http://docs.openstack.org/ext/volumes/api/v1.1", "alias": "os-volumes", "description": "Volumes support"}"#;
    // Seed 002's descriptor, as its sample shows it.
    let shared_fs = r#"{"updated": "2012-04-11T00:00:00+00:00", "name": "Shared_fs", "links": [], "namespace": "http://docs.openstack.org/ext/shared_filesystem/api/v1.1", "alias": "os-shared-filesystem", "description": "Shared filesystem support"}"#;
    for prefix in ["/v1.1", "/v2", "/v2.1"] {
        let a = api.under(prefix);
        let r = a.get("/extensions");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.body,
            format!(r#"{{"extensions": [{descriptor}, {shared_fs}]}}"#)
        );
        let r = a.get("/extensions/os-shared-filesystem");
        assert_eq!(r.body, format!(r#"{{"extension": {shared_fs}}}"#));
        let r = a.get("/extensions/os-volumes");
        assert_eq!(r.body, format!(r#"{{"extension": {descriptor}}}"#));
        let m = fault(&a.get("/extensions/os-nope"), 404, "itemNotFound");
        assert_eq!(m, "Extension os-nope could not be found.");
    }

    // Create: 200 with every key of the view.
    let r = api.post(
        "/os-volumes",
        &json!({"volume": {"size": "2", "display_name": "data", "display_description": "d1",
            "availability_zone": "nova", "volume_type": "fast", "metadata": {"k": "v"}}}),
    );
    let v = ok(&r, 200)["volume"].clone();
    let id = v["id"].as_str().expect("id").to_owned();
    assert_eq!(
        r.header("location"),
        Some(format!("{}/v1.1/{}/os-volumes/{id}", c.url(""), api.tenant).as_str())
    );
    let created_at = v["createdAt"].as_str().expect("createdAt").to_owned();
    assert_eq!(
        v,
        json!({"id": id, "status": "available", "size": 2, "availabilityZone": "nova",
            "createdAt": created_at, "attachments": [{}], "displayName": "data",
            "displayDescription": "d1", "volumeType": "fast", "snapshotId": null,
            "metadata": {"k": "v"}})
    );
    // 2013-02-18T14:51:17.970024: microseconds, no zone suffix
    assert_eq!(created_at.len(), 26, "{created_at}");
    assert!(
        time::PrimitiveDateTime::parse(
            &created_at,
            time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]"
            )
        )
        .is_ok(),
        "{created_at}"
    );
    let r = api.get(&format!("/os-volumes/{id}"));
    assert_eq!(ok(&r, 200), json!({"volume": v}));
    let rid = r
        .header("x-openstack-request-id")
        .expect("request id")
        .to_owned();
    assert!(rid.starts_with("req-") && rid.len() == 40, "{rid}");
    assert_eq!(r.header("x-compute-request-id"), Some(rid.as_str()));

    // A bare minimum volume: nulls and defaults, all 11 keys.
    let w = create_volume(
        &api,
        json!({"volume": {"size": 1, "display_name": null, "volume_type": null}}),
    );
    let wid = w["id"].as_str().expect("id").to_owned();
    let keys: Vec<&str> = w
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 11, "{w}");
    assert_eq!(w["displayName"], Value::Null);
    assert_eq!(w["metadata"], json!({}));
    assert_eq!(w["attachments"], json!([{}]));

    // Lists (index and detail share the view), pagination.
    for path in ["/os-volumes", "/os-volumes/detail"] {
        assert_eq!(ok(&api.get(path), 200), json!({"volumes": [v, w]}));
    }
    assert_eq!(
        ok(&api.get("/os-volumes?limit=1"), 200),
        json!({"volumes": [v]})
    );
    assert_eq!(
        ok(&api.get("/os-volumes/detail?limit=1&offset=1"), 200),
        json!({"volumes": [w]})
    );
    assert_eq!(
        ok(&api.get("/os-volumes?offset=5"), 200),
        json!({"volumes": []})
    );
    assert_eq!(
        fault(&api.get("/os-volumes?limit=abc"), 400, "badRequest"),
        "limit param must be an integer"
    );
    assert_eq!(
        fault(&api.get("/os-volumes?offset=-2"), 400, "badRequest"),
        "offset param must be positive"
    );
    // all_tenants: the admin sees every project's volumes (here the same two).
    assert_eq!(
        ok(&api.get("/os-volumes?all_tenants=1"), 200)["volumes"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Create validation: each a 400 (or 404 / 415) that creates nothing.
    let bad: &[(&str, u16, &str)] = &[
        ("", 400, "badRequest"),
        ("{not json", 400, "badRequest"),
        ("[]", 400, "badRequest"),
        ("{}", 400, "badRequest"),
        (r#"{"volume": "x"}"#, 400, "badRequest"),
        (r#"{"volume": {}}"#, 400, "badRequest"),
        (r#"{"volume": {"size": 0}}"#, 400, "badRequest"),
        (r#"{"volume": {"size": -3}}"#, 400, "badRequest"),
        (r#"{"volume": {"size": 2.5}}"#, 400, "badRequest"),
        (r#"{"volume": {"size": "ten"}}"#, 400, "badRequest"),
        (r#"{"volume": {"size": null}}"#, 400, "badRequest"),
        (
            r#"{"volume": {"size": 123456789012345678901234567890}}"#,
            400,
            "badRequest",
        ),
        (
            r#"{"volume": {"size": "99999999999999999999"}}"#,
            400,
            "badRequest",
        ),
        (r#"{"volume": {"size": 8589934592}}"#, 400, "badRequest"),
        (
            r#"{"volume": {"size": 1, "colour": "red"}}"#,
            400,
            "badRequest",
        ),
        (
            r#"{"volume": {"size": 1}, "more": true}"#,
            400,
            "badRequest",
        ),
        (
            r#"{"volume": {"size": 1, "metadata": "k=v"}}"#,
            400,
            "badRequest",
        ),
        (
            r#"{"volume": {"size": 1, "metadata": {"k": 1}}}"#,
            400,
            "badRequest",
        ),
        (
            r#"{"volume": {"size": 1, "display_name": ["x"]}}"#,
            400,
            "badRequest",
        ),
        (
            r#"{"volume": {"size": 1, "snapshot_id": "0e1d"}}"#,
            404,
            "itemNotFound",
        ),
    ];
    for (body, status, name) in bad {
        let r = api.call("POST", "/os-volumes", Some(body));
        fault(&r, *status, name);
    }
    let r = c.request(
        "POST",
        &format!("/v1.1/{}/os-volumes", api.tenant),
        &[("x-auth-token", &api.token)],
        Some(("text/plain", r#"{"volume": {"size": 1}}"#)),
    );
    fault(&r, 415, "badMediaType");
    assert_eq!(
        ok(&api.get("/os-volumes"), 200)["volumes"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "a refused create created something"
    );

    // Show / delete errors.
    for bogus in [NO_SUCH, "not-a-uuid"] {
        let m = fault(
            &api.get(&format!("/os-volumes/{bogus}")),
            404,
            "itemNotFound",
        );
        assert_eq!(m, format!("Volume {bogus} could not be found."));
        fault(
            &api.delete(&format!("/os-volumes/{bogus}")),
            404,
            "itemNotFound",
        );
    }

    // Unknown paths and methods under the family's prefixes.
    fault(&api.get("/no-such-thing"), 404, "itemNotFound");
    fault(
        &api.get(&format!("/os-volumes/{id}/extra")),
        404,
        "itemNotFound",
    );
    fault(&api.under("/v2.1").get("/bogus/path"), 404, "itemNotFound");
    fault(
        &api.call("PUT", "/os-volumes", Some("{}")),
        405,
        "badMethod",
    );
    fault(
        &api.call("POST", &format!("/os-volumes/{id}"), Some("{}")),
        405,
        "badMethod",
    );

    // Delete: 202, empty body, then gone.
    let r = api.delete(&format!("/os-volumes/{wid}"));
    assert_eq!((r.status, r.body.as_str()), (202, ""));
    fault(&api.get(&format!("/os-volumes/{wid}")), 404, "itemNotFound");
    assert_eq!(ok(&api.get("/os-volumes"), 200), json!({"volumes": [v]}));

    // The same routes under /v2 and /v2.1.
    for prefix in ["/v2", "/v2.1"] {
        let a = api.under(prefix);
        assert_eq!(
            ok(&a.get(&format!("/os-volumes/{id}")), 200),
            json!({"volume": v})
        );
        let x = create_volume(&a, json!({"volume": {"size": 1}}));
        let r = a.delete(&format!("/os-volumes/{}", x["id"].as_str().expect("id")));
        assert_eq!(r.status, 202, "{}", r.body);
    }
}

#[test]
fn servers_and_attachments_with_every_error() {
    let c = daemon();
    let api = Api::new(&c, token(&c, "admin", PW, "admin"));
    let vol = create_volume(&api, json!({"volume": {"size": 1}}));
    let vid = vol["id"].as_str().expect("id").to_owned();
    let vol2 = create_volume(&api, json!({"volume": {"size": 1}}));
    let vid2 = vol2["id"].as_str().expect("id").to_owned();

    // Servers: create (202, nova's reservation body), list, detail, show.
    let r = api.post(
        "/servers",
        &json!({"server": {"name": "vm1", "imageRef": "", "flavorRef": "1",
            "metadata": {"role": "db"}}}),
    );
    let s = ok(&r, 202)["server"].clone();
    let sid = s["id"].as_str().expect("id").to_owned();
    assert!(uuid::Uuid::parse_str(&sid).is_ok(), "{sid}");
    let self_href = format!("{}/v1.1/{}/servers/{sid}", c.url(""), api.tenant);
    assert_eq!(
        s,
        json!({"id": sid, "links": [
            {"rel": "self", "href": self_href},
            {"rel": "bookmark", "href": format!("{}/{}/servers/{sid}", c.url(""), api.tenant)}],
            "OS-DCF:diskConfig": "MANUAL", "security_groups": [{"name": "default"}]})
    );
    assert_eq!(r.header("location"), Some(self_href.as_str()));
    assert_eq!(
        ok(&api.get("/servers"), 200),
        json!({"servers": [{"id": sid, "name": "vm1", "links": s["links"]}]})
    );
    let full = ok(&api.get(&format!("/servers/{sid}")), 200)["server"].clone();
    assert_eq!(full["id"], sid.as_str());
    assert_eq!(full["name"], "vm1");
    assert_eq!(full["status"], "ACTIVE");
    assert_eq!(full["tenant_id"], api.tenant.as_str());
    assert_eq!(full["metadata"], json!({"role": "db"}));
    assert_eq!(full["addresses"], json!({}));
    assert!(full["user_id"].is_string(), "{full}");
    assert_eq!(full["created"].as_str().map(str::len), Some(20), "{full}");
    assert_eq!(
        ok(&api.get("/servers/detail"), 200),
        json!({"servers": [full]})
    );
    for body in [
        json!({"server": {}}),
        json!({"server": {"name": "  "}}),
        json!({"server": {"name": 7}}),
        json!({"server": {"name": "x", "wings": 2}}),
        json!({"server": {"name": "x", "metadata": {"a": ["b"]}}}),
        json!({"instance": {"name": "x"}}),
    ] {
        fault(&api.post("/servers", &body), 400, "badRequest");
    }
    fault(
        &api.get(&format!("/servers/{NO_SUCH}")),
        404,
        "itemNotFound",
    );
    fault(&api.get("/servers/not-a-uuid"), 404, "itemNotFound");
    fault(
        &api.delete(&format!("/servers/{NO_SUCH}")),
        404,
        "itemNotFound",
    );
    assert_eq!(
        ok(&api.get("/servers"), 200)["servers"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // Attach: 202 with the attachment and the export's NBD URI; device assigned if not asked.
    let att = format!("/servers/{sid}/os-volume_attachments");
    let r = api.post(&att, &json!({"volumeAttachment": {"volumeId": vid}}));
    let a = ok(&r, 202)["volumeAttachment"].clone();
    let nbd = a["nbdUri"].as_str().expect("nbdUri").to_owned();
    assert!(
        nbd.starts_with("nbd://127.0.0.1:") && nbd.ends_with(&format!("/{vid}")),
        "{nbd}"
    );
    assert_eq!(
        a,
        json!({"id": vid, "serverId": sid, "volumeId": vid, "device": "/dev/vdb", "nbdUri": nbd})
    );
    let r = api.post(
        &att,
        &json!({"volumeAttachment": {"volumeId": vid2, "device": "/dev/vdd"}}),
    );
    let a2 = ok(&r, 202)["volumeAttachment"].clone();
    assert_eq!(a2["device"], "/dev/vdd");

    // The server and volume views show it.
    assert_eq!(
        ok(&api.get(&format!("/servers/{sid}")), 200)["server"]["os-extended-volumes:volumes_attached"],
        json!([{"id": vid}, {"id": vid2}])
    );
    let shown = ok(&api.get(&format!("/os-volumes/{vid}")), 200)["volume"].clone();
    assert_eq!(shown["status"], "in-use");
    assert_eq!(
        shown["attachments"],
        json!([{"id": vid, "volumeId": vid, "serverId": sid, "device": "/dev/vdb"}])
    );

    // List and show.
    assert_eq!(
        ok(&api.get(&att), 200),
        json!({"volumeAttachments": [a, a2]})
    );
    assert_eq!(
        ok(&api.get(&format!("{att}?limit=1&offset=1")), 200),
        json!({"volumeAttachments": [a2]})
    );
    assert_eq!(
        ok(&api.get(&format!("{att}/{vid}")), 200),
        json!({"volumeAttachment": a})
    );
    // A UUID is the same id in any case, as attach and detach already treat it.
    assert_eq!(
        ok(&api.get(&format!("{att}/{}", vid.to_uppercase())), 200),
        json!({"volumeAttachment": a})
    );

    // Attach errors: each changes nothing.
    let other = create_server(&api, "vm2");
    let m = fault(
        &api.post(
            &format!("/servers/{other}/os-volume_attachments"),
            &json!({"volumeAttachment": {"volumeId": vid}}),
        ),
        409,
        "conflictingRequest",
    );
    assert!(m.contains(&vid), "{m}");
    fault(
        &api.post(&att, &json!({"volumeAttachment": {"volumeId": vid}})),
        409,
        "conflictingRequest",
    );
    // A device path already taken, or the root disk's: nova's DevicePathInUse.
    let vid3 = create_volume(&api, json!({"volume": {"size": 1}}))["id"]
        .as_str()
        .expect("id")
        .to_owned();
    for dev in ["/dev/vdd", "/dev/vda", "/dev/vdb"] {
        let m = fault(
            &api.post(
                &att,
                &json!({"volumeAttachment": {"volumeId": vid3, "device": dev}}),
            ),
            409,
            "conflictingRequest",
        );
        assert_eq!(m, format!("The supplied device path ({dev}) is in use."));
    }
    assert_eq!(
        ok(&api.get(&format!("/os-volumes/{vid3}")), 200)["volume"]["status"],
        "available"
    );
    fault(
        &api.post(
            &format!("/servers/{NO_SUCH}/os-volume_attachments"),
            &json!({"volumeAttachment": {"volumeId": vid}}),
        ),
        404,
        "itemNotFound",
    );
    fault(
        &api.post(&att, &json!({"volumeAttachment": {"volumeId": NO_SUCH}})),
        404,
        "itemNotFound",
    );
    for body in [
        json!({"volumeAttachment": {}}),
        json!({"volumeAttachment": {"volumeId": "vol-1"}}),
        json!({"volumeAttachment": {"volumeId": vid, "device": "vdb"}}),
        json!({"volumeAttachment": {"volumeId": vid, "device": 5}}),
        json!({"volumeAttachment": {"volumeId": vid, "tag": "x"}}),
        json!({"attachment": {"volumeId": vid}}),
    ] {
        fault(&api.post(&att, &body), 400, "badRequest");
    }
    fault(&api.call("POST", &att, Some("{")), 400, "badRequest");
    assert_eq!(
        ok(&api.get(&att), 200)["volumeAttachments"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Show / list / swap / detach errors.
    fault(
        &api.get(&format!("/servers/{NO_SUCH}/os-volume_attachments")),
        404,
        "itemNotFound",
    );
    fault(
        &api.get(&format!("/servers/{other}/os-volume_attachments/{vid}")),
        404,
        "itemNotFound",
    );
    fault(&api.get(&format!("{att}/{NO_SUCH}")), 404, "itemNotFound");
    let m = fault(
        &api.call(
            "PUT",
            &format!("{att}/{vid}"),
            Some(&json!({"volumeAttachment": {"volumeId": vid2}}).to_string()),
        ),
        400,
        "badRequest",
    );
    assert!(m.contains("not supported"), "{m}");
    fault(
        &api.delete(&format!("/servers/{other}/os-volume_attachments/{vid}")),
        404,
        "itemNotFound",
    );
    fault(&api.call("PATCH", &att, Some("{}")), 405, "badMethod");

    // An attached volume cannot be deleted (nova relays cinder's 400).
    fault(
        &api.delete(&format!("/os-volumes/{vid}")),
        400,
        "badRequest",
    );
    assert_eq!(
        ok(&api.get(&format!("/os-volumes/{vid}")), 200)["volume"]["status"],
        "in-use"
    );

    // Detach: 202, empty body; the volume is available again.
    let r = api.delete(&format!("{att}/{vid}"));
    assert_eq!((r.status, r.body.as_str()), (202, ""));
    fault(&api.get(&format!("{att}/{vid}")), 404, "itemNotFound");
    fault(&api.delete(&format!("{att}/{vid}")), 404, "itemNotFound");
    let shown = ok(&api.get(&format!("/os-volumes/{vid}")), 200)["volume"].clone();
    assert_eq!(
        (shown["status"].clone(), shown["attachments"].clone()),
        (json!("available"), json!([{}]))
    );

    // Deleting the server detaches what it still has (204, as nova).
    let r = api.delete(&format!("/servers/{sid}"));
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    fault(&api.get(&format!("/servers/{sid}")), 404, "itemNotFound");
    fault(&api.get(&att), 404, "itemNotFound");
    let shown = ok(&api.get(&format!("/os-volumes/{vid2}")), 200)["volume"].clone();
    assert_eq!(
        (shown["status"].clone(), shown["attachments"].clone()),
        (json!("available"), json!([{}]))
    );
    let r = api.delete(&format!("/os-volumes/{vid2}"));
    assert_eq!(r.status, 202, "{}", r.body);
}

/// [`common::project_user`] with `admin`'s token.
fn project_user(c: &Cairn, admin: &Api, name: &str, role: &str) -> (String, String) {
    common::project_user(c, &admin.token, name, role)
}

#[test]
fn authentication_tenant_and_roles() {
    let c = daemon();
    let admin = Api::new(&c, token(&c, "admin", PW, "admin"));
    let vol = create_volume(&admin, json!({"volume": {"size": 1}}));
    let vid = vol["id"].as_str().expect("id").to_owned();
    let server = create_server(&admin, "vm");

    // No token / a bad token: 401 unauthorized, whatever the route.
    for (method, path) in [
        ("GET", "/extensions"),
        ("GET", "/os-volumes"),
        ("POST", "/os-volumes"),
        ("DELETE", "/os-volumes/x"),
        ("GET", "/servers"),
        ("POST", "/servers/x/os-volume_attachments"),
    ] {
        let url = format!("/v1.1/{}{path}", admin.tenant);
        let body = Some(("application/json", r#"{"volume": {"size": 1}}"#));
        let r = c.request(method, &url, &[], body);
        fault(&r, 401, "unauthorized");
        assert!(r.header("www-authenticate").is_some(), "{r:?}");
        let r = c.request(method, &url, &[("x-auth-token", "not-a-token")], body);
        fault(&r, 401, "unauthorized");
    }

    // Another tenant in the URL than the token's project: 400, and nothing happens.
    let wrong = Api {
        c: &c,
        token: admin.token.clone(),
        tenant: "someone-else".into(),
        prefix: "/v1.1",
    };
    let m = fault(
        &wrong.post("/os-volumes", &json!({"volume": {"size": 1}})),
        400,
        "badRequest",
    );
    assert_eq!(
        m,
        format!(
            "Malformed request URL: URL's project_id 'someone-else' doesn't match Context's project_id '{}'",
            admin.tenant
        )
    );
    fault(&wrong.get("/os-volumes"), 400, "badRequest");
    fault(
        &wrong.delete(&format!("/os-volumes/{vid}")),
        400,
        "badRequest",
    );
    fault(&wrong.under("/v2.1").get("/servers"), 400, "badRequest");

    // A reader of another project: reads its own (empty) project, writes nothing, and does
    // not see the admin project's volume.
    let reader = Api::new(&c, project_user(&c, &admin, "readers", "reader"));
    assert_eq!(ok(&reader.get("/os-volumes"), 200), json!({"volumes": []}));
    assert_eq!(ok(&reader.get("/servers"), 200), json!({"servers": []}));
    ok(&reader.get("/extensions"), 200);
    fault(
        &reader.post("/os-volumes", &json!({"volume": {"size": 1}})),
        403,
        "forbidden",
    );
    fault(
        &reader.post("/servers", &json!({"server": {"name": "r"}})),
        403,
        "forbidden",
    );
    fault(
        &reader.get(&format!("/os-volumes/{vid}")),
        404,
        "itemNotFound",
    );
    assert_eq!(ok(&reader.get("/os-volumes"), 200), json!({"volumes": []}));
    // A reader's all_tenants is ignored (its own project only).
    assert_eq!(
        ok(&reader.get("/os-volumes?all_tenants=1"), 200),
        json!({"volumes": []})
    );

    // A member of another project: writes its own project, cannot touch the admin's things.
    let member = Api::new(&c, project_user(&c, &admin, "members", "member"));
    let mine = create_volume(&member, json!({"volume": {"size": 1}}));
    let my_server = create_server(&member, "mine");
    fault(
        &member.get(&format!("/os-volumes/{vid}")),
        404,
        "itemNotFound",
    );
    fault(
        &member.delete(&format!("/os-volumes/{vid}")),
        404,
        "itemNotFound",
    );
    fault(
        &member.get(&format!("/servers/{server}")),
        404,
        "itemNotFound",
    );
    fault(
        &member.post(
            &format!("/servers/{my_server}/os-volume_attachments"),
            &json!({"volumeAttachment": {"volumeId": vid}}),
        ),
        404,
        "itemNotFound",
    );
    fault(
        &member.post(
            &format!("/servers/{server}/os-volume_attachments"),
            &json!({"volumeAttachment": {"volumeId": mine["id"]}}),
        ),
        404,
        "itemNotFound",
    );
    // The admin's all_tenants listing sees both projects' volumes.
    let all = ok(&admin.get("/os-volumes?all_tenants=1"), 200);
    assert_eq!(all["volumes"].as_array().map(Vec::len), Some(2), "{all}");
    assert_eq!(
        ok(&admin.get("/os-volumes"), 200),
        json!({"volumes": [vol]})
    );
    assert_eq!(
        ok(&admin.get(&format!("/os-volumes/{vid}")), 200)["volume"]["attachments"],
        json!([{}])
    );
}

#[test]
fn version_documents_and_microversions() {
    let c = daemon();
    let (tok, tenant) = token(&c, "admin", PW, "admin");
    for path in [
        "/v2.1".to_owned(),
        "/v2.1/".to_owned(),
        format!("/v2.1/{tenant}"),
    ] {
        let r = c.get(&path);
        let v = ok(&r, 200)["version"].clone();
        assert_eq!(v["id"], "v2.1", "{path}");
        assert_eq!(v["status"], "CURRENT");
        assert_eq!(v["version"], "2.35");
        assert_eq!(v["min_version"], "2.1");
        assert_eq!(v["links"][0]["href"], format!("{}/v2.1/", c.url("")));
    }
    let v = ok(&c.get(&format!("/v2/{tenant}")), 200)["version"].clone();
    assert_eq!(
        (v["id"].clone(), v["status"].clone()),
        (json!("v2.0"), json!("SUPPORTED"))
    );

    let call = |hdr: (&str, &str)| {
        c.request(
            "GET",
            &format!("/v2.1/{tenant}/os-volumes"),
            &[("x-auth-token", &tok), hdr],
            None,
        )
    };
    let r = call(("x-openstack-nova-api-version", "2.35"));
    assert_eq!(ok(&r, 200), json!({"volumes": []}));
    assert_eq!(r.header("x-openstack-nova-api-version"), Some("2.35"));
    assert_eq!(r.header("openstack-api-version"), Some("compute 2.35"));
    let r = call(("openstack-api-version", "compute 2.5"));
    assert_eq!(r.header("openstack-api-version"), Some("compute 2.5"));
    let r = call(("openstack-api-version", "compute latest"));
    assert_eq!(r.header("x-openstack-nova-api-version"), Some("2.35"));
    let r = call(("x-openstack-nova-api-version", "2.36"));
    assert_eq!(
        fault(&r, 406, "computeFault"),
        "Version 2.36 is not supported by the API. Minimum is 2.1 and maximum is 2.35."
    );
    fault(
        &call(("x-openstack-nova-api-version", "2.x")),
        400,
        "badRequest",
    );
    // No header: 2.1.
    let r = c.request(
        "GET",
        &format!("/v2.1/{tenant}/os-volumes"),
        &[("x-auth-token", &tok)],
        None,
    );
    assert_eq!(r.header("x-openstack-nova-api-version"), Some("2.1"));
}

fn venv_python() -> PathBuf {
    let dir = std::env::var_os("CAIRN_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/cairn/test-venv")
        });
    let py = dir.join("bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/setup-test-deps (or set CAIRN_TEST_VENV)",
        py.display()
    );
    py
}

/// python-novaclient through a keystoneauth session built from `<data-dir>/clouds.yaml`:
/// server create / list / show and the volume attachment calls against the real daemon.
const NOVACLIENT: &str = r#"
import json, sys
import openstack.config
from novaclient import client

volume_id = sys.argv[1]
region = openstack.config.OpenStackConfig().get_one(cloud="cairn")
nova = client.Client("2.35", session=region.get_session())
out = {}
server = nova.servers.create("nova-vm", image=None, flavor="1", meta={"by": "novaclient"})
out["server_id"] = server.id
got = nova.servers.get(server.id)
out["server"] = {"name": got.name, "status": got.status, "metadata": got.metadata}
out["servers"] = sorted(s.name for s in nova.servers.list())
att = nova.volumes.create_server_volume(server.id, volume_id, "/dev/vdc")
out["attach"] = att.to_dict()
out["list"] = [a.to_dict() for a in nova.volumes.get_server_volumes(server.id)]
out["show"] = nova.volumes.get_server_volume(server.id, volume_id).to_dict()
nova.volumes.delete_server_volume(server.id, volume_id)
out["after"] = [a.to_dict() for a in nova.volumes.get_server_volumes(server.id)]
try:
    nova.volumes.get_server_volume(server.id, volume_id)
    out["missing"] = None
except Exception as e:
    out["missing"] = [type(e).__name__, getattr(e, "code", None)]
nova.servers.delete(server.id)
print(json.dumps(out))
"#;

#[test]
fn novaclient_attaches_lists_and_detaches() {
    let py = venv_python();
    let c = daemon();
    let api = Api::new(&c, token(&c, "admin", PW, "admin"));
    let vol = create_volume(&api, json!({"volume": {"size": 1}}));
    let vid = vol["id"].as_str().expect("id").to_owned();

    let out = Command::new(&py)
        .arg("-c")
        .arg(NOVACLIENT)
        .arg(&vid)
        .env("OS_CLIENT_CONFIG_FILE", c.data_dir().join("clouds.yaml"))
        .env_remove("OS_CLOUD")
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "novaclient failed: {}\n{stdout}\n--- daemon logs ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs.text()
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let sid = v["server_id"].as_str().expect("server id").to_owned();
    assert_eq!(
        v["server"],
        json!({"name": "nova-vm", "status": "ACTIVE", "metadata": {"by": "novaclient"}})
    );
    assert_eq!(v["servers"], json!(["nova-vm"]));
    let nbd = v["attach"]["nbdUri"].as_str().expect("nbdUri").to_owned();
    let a =
        json!({"id": vid, "serverId": sid, "volumeId": vid, "device": "/dev/vdc", "nbdUri": nbd});
    assert_eq!(v["attach"], a);
    assert_eq!(v["list"], json!([a]));
    assert_eq!(v["show"], a);
    assert_eq!(v["after"], json!([]));
    assert_eq!(v["missing"], json!(["NotFound", 404]));

    // What the client did is what the API shows.
    fault(&api.get(&format!("/servers/{sid}")), 404, "itemNotFound");
    let shown = ok(&api.get(&format!("/os-volumes/{vid}")), 200)["volume"].clone();
    assert_eq!(shown["status"], "available");
}

/// The `nova` command line: it discovers the microversion with `GET /v2.1/{project}` (2.35
/// here), finds the server by name, and attaches, lists and detaches.
#[test]
fn nova_cli_discovers_the_version_and_attaches_by_server_name() {
    let py = venv_python();
    let nova = py.with_file_name("nova");
    assert!(
        nova.exists(),
        "{} is missing: run scripts/setup-test-deps",
        nova.display()
    );
    let c = daemon();
    let api = Api::new(&c, token(&c, "admin", PW, "admin"));
    let vid = create_volume(&api, json!({"volume": {"size": 1}}))["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let sid = create_server(&api, "cli-vm");
    let run = |args: &[&str]| {
        let out = Command::new(&nova)
            .args(["--os-compute-api-version", "2.latest"])
            .args(args)
            .env("OS_AUTH_URL", c.url("/v3"))
            .env("OS_USERNAME", "admin")
            .env("OS_PASSWORD", PW)
            .env("OS_PROJECT_NAME", "admin")
            .env("OS_USER_DOMAIN_NAME", "Default")
            .env("OS_PROJECT_DOMAIN_NAME", "Default")
            .env_remove("OS_CLOUD")
            .env_remove("OS_CLIENT_CONFIG_FILE")
            .output()
            .expect("run nova");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };
    let (ok_, out, err) = run(&["--debug", "volume-attach", "cli-vm", &vid, "/dev/vde"]);
    assert!(ok_, "{out}\n{err}");
    // Discovery (`GET` of the bare catalog endpoint) found the ceiling, and the attach was
    // sent at it.
    let discovery = format!(
        "-X GET {} ",
        c.url(&format!("/compute/v2.1/{}", api.tenant))
    );
    assert!(err.contains(&discovery), "no discovery request:\n{err}");
    assert!(err.contains("X-OpenStack-Nova-API-Version: 2.35"), "{err}");
    let row = out
        .lines()
        .find(|l| l.contains("| device"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("/dev/vde"), "{out}");
    let (ok_, out, err) = run(&["volume-attachments", &sid]);
    assert!(ok_, "{out}\n{err}");
    let row = out
        .lines()
        .find(|l| l.contains(&sid))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(&vid) && row.contains("/dev/vde"), "{out}");
    // A second attach of the same volume: the client reports the 409.
    let (ok_, _, err) = run(&["volume-attach", &sid, &vid]);
    assert!(!ok_ && err.contains("HTTP 409"), "{err}");
    let (ok_, out, err) = run(&["volume-detach", "cli-vm", &vid]);
    assert!(ok_, "{out}\n{err}");
    assert_eq!(
        ok(
            &api.get(&format!("/servers/{sid}/os-volume_attachments")),
            200
        ),
        json!({"volumeAttachments": []})
    );
}

/// Seed 002's `os-filesystem` over HTTP: create and resize by `PUT`, list, show, instances
/// that follow the scope (servers made later included, deleted ones gone), connecting and
/// disconnecting instances, and every refusal as a Compute fault that changes nothing.
#[test]
fn shared_filesystems_follow_the_seed() {
    let c = daemon();
    let admin = Api::new(&c, token(&c, "admin", PW, "admin"));
    let alice = Api::new(&c, project_user(&c, &admin, "alice", "member"));
    let bob = Api::new(&c, project_user(&c, &admin, "bob", "member"));
    let put = |api: &Api, path: &str, body: Value| api.call("PUT", path, Some(&body.to_string()));
    let entry = |size: &str, scope: &str| json!({"fs_entry": {"size": size, "scope": scope}});

    // Made, echoed as the seed shows it; the same PUT resizes.
    let r = ok(
        &put(&alice, "/os-filesystem/home", entry("4Gb", "project")),
        200,
    );
    assert_eq!(
        r,
        json!({"fs_entry": {"name": "home", "size": "4Gb", "scope": "project", "project": alice.tenant}})
    );
    let r = ok(
        &put(&alice, "/os-filesystem/home", entry("8Gb", "project")),
        200,
    );
    assert_eq!(r["fs_entry"]["size"], "8Gb");
    let r = ok(
        &put(&alice, "/os-filesystem/scratch", entry("1Gb", "instance")),
        200,
    );
    assert_eq!(
        r,
        json!({"fs_entry": {"name": "scratch", "size": "1Gb", "scope": "instance"}})
    );
    ok(
        &put(&admin, "/os-filesystem/data", entry("80Gb", "global")),
        200,
    );

    // Refusals.
    for (api, path, body, status, name) in [
        (
            &alice,
            "/os-filesystem/g",
            entry("4Gb", "global"),
            403,
            "forbidden",
        ),
        (
            &bob,
            "/os-filesystem/home",
            entry("4Gb", "project"),
            409,
            "conflictingRequest",
        ),
        (
            &alice,
            "/os-filesystem/home",
            entry("4Gb", "instance"),
            409,
            "conflictingRequest",
        ),
        (
            &alice,
            "/os-filesystem/x",
            entry("4Pb", "project"),
            400,
            "badRequest",
        ),
        (
            &alice,
            "/os-filesystem/x",
            entry("4Gb", "planet"),
            400,
            "badRequest",
        ),
        (
            &alice,
            "/os-filesystem/.x",
            entry("4Gb", "project"),
            400,
            "badRequest",
        ),
        (
            &alice,
            "/os-filesystem/x",
            json!({"size": "4Gb"}),
            400,
            "badRequest",
        ),
        (
            &alice,
            "/os-filesystem/x",
            json!({"fs_entry": {"size": "4Gb", "scope": "project", "project": bob.tenant}}),
            403,
            "forbidden",
        ),
    ] {
        fault(&put(api, path, body), status, name);
    }
    let names = |api: &Api| {
        ok(&api.get("/os-filesystem"), 200)["fs_entries"]
            .as_array()
            .expect("fs_entries")
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&alice), ["data", "home", "scratch"]);
    assert_eq!(names(&bob), ["data"]);
    fault(&bob.get("/os-filesystem/home"), 404, "itemNotFound");
    fault(&bob.delete("/os-filesystem/home"), 404, "itemNotFound");
    fault(&alice.delete("/os-filesystem/data"), 403, "forbidden");
    let r = ok(&alice.get("/os-filesystem/data"), 200);
    assert_eq!(
        r,
        json!({"fs_entry": {"name": "data", "size": "80Gb", "scope": "global"}})
    );

    // Instances follow the scope.
    let instances = |api: &Api, name: &str| {
        let mut v: Vec<String> =
            ok(&api.get(&format!("/os-filesystem/{name}/instances")), 200)["instance_entries"]
                .as_array()
                .expect("instance_entries")
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_owned())
                .collect();
        v.sort();
        v
    };
    let s1 = create_server(&alice, "one");
    let s2 = create_server(&bob, "two");
    assert_eq!(instances(&alice, "home"), std::slice::from_ref(&s1));
    let mut both = vec![s1.clone(), s2.clone()];
    both.sort();
    assert_eq!(instances(&alice, "data"), both);
    assert!(instances(&alice, "scratch").is_empty());
    let r = ok(
        &alice.call(
            "PUT",
            &format!("/os-filesystem/scratch/instances/{s1}"),
            None,
        ),
        200,
    );
    assert_eq!(r, json!({"instance_entry": {"id": s1}}));
    assert_eq!(instances(&alice, "scratch"), std::slice::from_ref(&s1));
    fault(
        &alice.call(
            "PUT",
            &format!("/os-filesystem/scratch/instances/{s2}"),
            None,
        ),
        404,
        "itemNotFound",
    );
    fault(
        &alice.call("PUT", &format!("/os-filesystem/home/instances/{s1}"), None),
        400,
        "badRequest",
    );
    let s3 = create_server(&alice, "three");
    let mut home = vec![s1.clone(), s3.clone()];
    home.sort();
    assert_eq!(instances(&alice, "home"), home);
    let r = alice.delete(&format!("/servers/{s1}"));
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(instances(&alice, "home"), std::slice::from_ref(&s3));
    assert!(instances(&alice, "scratch").is_empty());
    fault(
        &alice.delete(&format!("/os-filesystem/scratch/instances/{s3}")),
        404,
        "itemNotFound",
    );
    ok(
        &alice.call(
            "PUT",
            &format!("/os-filesystem/scratch/instances/{s3}"),
            None,
        ),
        200,
    );
    assert_eq!(
        alice
            .delete(&format!("/os-filesystem/scratch/instances/{s3}"))
            .status,
        202
    );
    assert_eq!(alice.delete("/os-filesystem/scratch").status, 202);
    fault(&alice.get("/os-filesystem/scratch"), 404, "itemNotFound");
    assert_eq!(names(&alice), ["data", "home"]);
}
