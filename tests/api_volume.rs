//! Block Storage (cinder v3, and v2 as seed 003 uses it) on the real daemon: the `openstack`
//! CLI and python-cinderclient managing volumes, the same volumes Compute sees and attaches;
//! version discovery at the catalog's endpoints; and every error in cinder's fault format.

mod common;

use common::{Cairn, Out, Reply, Serve, admin_token, attach, metric, os_client, osc, run, server};
use serde_json::{Value, json};

const PW: &str = "volume-test-admin-pw";
const NO_SUCH: &str = "6edbc2f4-1507-44f8-ac0d-eed1d2608d38";

fn daemon() -> Cairn {
    Serve::new().arg("--admin-password").arg(PW).start()
}

fn cinder(c: &Cairn, args: &[&str]) -> Out {
    run(os_client(c, "cinder", PW).args(args))
}

/// `cinder upload-to-image --force True --disk-format <format> <volume> <name>`, which must
/// succeed: the new image's id, from cinder's table.
fn cinder_upload(c: &Cairn, volume: &str, format: &str, name: &str) -> String {
    let up = cinder(
        c,
        &[
            "upload-to-image",
            "--force",
            "True",
            "--disk-format",
            format,
            volume,
            name,
        ],
    );
    assert!(up.ok, "{}{}", up.stdout, up.stderr);
    up.stdout
        .lines()
        .find(|l| l.contains("image_id"))
        .and_then(|l| l.split('|').nth(2))
        .map(|s| s.trim().to_owned())
        .expect("image_id in cinder's table")
}

/// A caller of the Block Storage API under `/volume/v3/{project}` (or another prefix).
struct Api<'a> {
    c: &'a Cairn,
    token: String,
    project: String,
    prefix: &'static str,
}

impl<'a> Api<'a> {
    fn new(c: &'a Cairn, token: &str, project: &str, prefix: &'static str) -> Api<'a> {
        Api {
            c,
            token: token.to_owned(),
            project: project.to_owned(),
            prefix,
        }
    }
    fn path(&self, rest: &str) -> String {
        format!("{}/{}{rest}", self.prefix, self.project)
    }
    fn call(&self, method: &str, rest: &str, body: Option<&Value>) -> Reply {
        let body = body.map(Value::to_string);
        self.c.request(
            method,
            &self.path(rest),
            &[("X-Auth-Token", &self.token)],
            body.as_deref().map(|b| ("application/json", b)),
        )
    }
    fn get(&self, rest: &str) -> Reply {
        self.call("GET", rest, None)
    }
}

/// `qemu-io -c <cmd>` on an NBD URI; the command must succeed (a pattern read included).
fn qemu_io(uri: &str, cmd: &str) {
    let o = run(std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd])
        .arg(uri));
    assert!(
        o.ok && !o.stdout.contains("fail") && !o.stdout.contains("error"),
        "{cmd} on {uri}: {}{}",
        o.stdout,
        o.stderr
    );
}

/// A 4 KiB write through `uri` is refused (the export is read-only).
fn write_refused(uri: &str, what: &str) {
    let w = run(std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 4k"])
        .arg(uri));
    let said = |t: &str| t.contains("ermission") || t.contains("read-only");
    assert!(
        !w.ok || said(&w.stdout) || said(&w.stderr),
        "{what}: {}{}",
        w.stdout,
        w.stderr
    );
}

/// `qemu-io -r -c <cmd>` (a `read -P` pattern check) on `uri` succeeds.
fn read_matches(uri: &str, cmd: &str) {
    let r = run(std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", cmd])
        .arg(uri));
    assert!(
        r.ok && !r.stdout.contains("fail"),
        "{}{}",
        r.stdout,
        r.stderr
    );
}

/// A 1 GiB volume made with the CLI and attached to a new server: (volume, server, NBD URI).
fn attached_volume(c: &Cairn, token: &str, project: &str, name: &str) -> (String, String, String) {
    let v = osc(c, &["volume", "create", "--size", "1", "-f", "json", name]).json();
    let vid = v["id"].as_str().expect("volume id").to_owned();
    let sid = server(c, token, project);
    let uri = attach(c, token, project, &sid, &vid);
    (vid, sid, uri)
}

/// Polls `f` (every 50 ms, for up to two minutes) until it gives a value; past that, fails
/// with what `state` says of the last look.
fn eventually<T>(mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        match f() {
            Ok(v) => return v,
            Err(state) => assert!(std::time::Instant::now() < deadline, "{state}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Waits until an upload job stands at the fault-injection gate (`CAIRN_UPLOAD_GATE`).
fn wait_at_gate(c: &Cairn, gate: &std::path::Path) {
    eventually(|| {
        gate.with_extension("waiting")
            .exists()
            .then_some(())
            .ok_or_else(|| format!("the upload never started\n{}", c.logs.text()))
    });
}

/// Waits until an upload has ended: its image `active` and the volume no longer `uploading`
/// (the job restores the volume's status after the image is done). Returns the image.
fn wait_upload(c: &Cairn, token: &str, project: &str, volume: &str, image: &str) -> Value {
    let get = |path: String| {
        c.request("GET", &path, &[("X-Auth-Token", token)], None)
            .json()
    };
    eventually(|| {
        let i = get(format!("/v2/images/{image}"));
        let v = get(format!("/volume/v3/{project}/volumes/{volume}"));
        if i["status"] == "active" && v["volume"]["status"] != "uploading" {
            Ok(i)
        } else {
            Err(format!("upload not done: {i}\n{v}\n{}", c.logs.text()))
        }
    })
}

/// A cinder fault: the status, `{"<name>": {"message", "code"}}`, and the message.
fn fault(r: &Reply, status: u16, name: &str) -> String {
    assert_eq!(r.status, status, "{}", r.body);
    let v = r.json();
    assert_eq!(v[name]["code"], status, "{v}");
    assert!(
        r.header("x-openstack-request-id")
            .is_some_and(|id| id.starts_with("req-")),
        "no request id"
    );
    v[name]["message"].as_str().expect("message").to_owned()
}

#[test]
fn openstack_and_cinder_manage_the_volumes_compute_attaches() {
    let c = daemon();
    let (token, project) = admin_token(&c, PW);

    let v = osc(
        &c,
        &[
            "volume",
            "create",
            "--size",
            "1",
            "--description",
            "hello",
            "--property",
            "k=v",
            "-f",
            "json",
            "v1",
        ],
    )
    .json();
    assert_eq!(v["status"], "available", "{v}");
    assert_eq!(v["size"], 1);
    assert_eq!(v["description"], "hello");
    assert_eq!(v["properties"], json!({"k": "v"}));
    assert_eq!(v["bootable"], false);
    let v1 = v["id"].as_str().unwrap().to_owned();

    let set = osc(
        &c,
        &[
            "volume",
            "set",
            "--name",
            "v1b",
            "--description",
            "d2",
            "--property",
            "a=b",
            "v1",
        ],
    );
    assert!(set.ok, "{}", set.stderr);
    let unset = osc(&c, &["volume", "unset", "--property", "k", "v1b"]);
    assert!(unset.ok, "{}", unset.stderr);
    let v = osc(&c, &["volume", "show", "-f", "json", "v1b"]).json();
    assert_eq!(
        (v["name"].as_str(), v["description"].as_str()),
        (Some("v1b"), Some("d2"))
    );
    assert_eq!(v["properties"], json!({"a": "b"}));
    let missing = osc(&c, &["volume", "unset", "--property", "zz", "v1b"]);
    assert!(
        !missing.ok && missing.stderr.contains("Metadata item was not found"),
        "{}",
        missing.stderr
    );

    // cinderclient: create, show by name, list, delete.
    let made = cinder(&c, &["create", "2", "--name", "c1"]);
    assert!(
        made.ok && made.stdout.contains("| c1 "),
        "{}{}",
        made.stdout,
        made.stderr
    );
    let shown = cinder(&c, &["show", "c1"]);
    assert!(
        shown.ok && shown.stdout.contains("available"),
        "{}",
        shown.stdout
    );
    let list = cinder(&c, &["list"]);
    assert!(
        list.ok && list.stdout.contains("c1") && list.stdout.contains("v1b"),
        "{}",
        list.stdout
    );
    let del = cinder(&c, &["delete", "c1"]);
    assert!(del.ok, "{}", del.stderr);
    let list = osc(&c, &["volume", "list", "-f", "json"]).json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["Name"].as_str())
        .collect();
    assert_eq!(names, ["v1b"]);

    // One model: Compute sees the volume, attaches it, and Block Storage shows that.
    let compute = |method: &str, rest: &str, body: Option<Value>| {
        let body = body.map(|b| b.to_string());
        c.request(
            method,
            &format!("/compute/v2.1/{project}{rest}"),
            &[("X-Auth-Token", &token)],
            body.as_deref().map(|b| ("application/json", b)),
        )
    };
    let r = compute("GET", &format!("/os-volumes/{v1}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["volume"]["displayName"], "v1b");
    let r = compute("POST", "/servers", Some(json!({"server": {"name": "vm"}})));
    assert!(matches!(r.status, 200 | 202), "{}", r.body);
    let sid = r.json()["server"]["id"].as_str().unwrap().to_owned();
    let r = compute(
        "POST",
        &format!("/servers/{sid}/os-volume_attachments"),
        Some(json!({"volumeAttachment": {"volumeId": v1}})),
    );
    assert!(matches!(r.status, 200 | 202), "{}", r.body);
    let v = osc(&c, &["volume", "show", "-f", "json", &v1]).json();
    assert_eq!(v["status"], "in-use", "{v}");
    assert_eq!(v["attachments"][0]["server_id"], sid.as_str(), "{v}");
    let refused = osc(&c, &["volume", "delete", &v1]);
    assert!(
        !refused.ok && refused.stderr.contains("Invalid volume"),
        "{}",
        refused.stderr
    );
    let r = compute(
        "DELETE",
        &format!("/servers/{sid}/os-volume_attachments/{v1}"),
        None,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let del = osc(&c, &["volume", "delete", &v1]);
    assert!(del.ok, "{}", del.stderr);
    let r = compute("GET", &format!("/os-volumes/{v1}"), None);
    assert_eq!(r.status, 404, "{}", r.body);
}

#[test]
fn discovery_paging_metadata_and_cinder_faults() {
    let c = daemon();
    let (token, project) = admin_token(&c, PW);
    let api = Api::new(&c, &token, &project, "/volume/v3");

    // Version documents at the roots of the catalog's endpoints (no token needed).
    let root = c.get("/volume").json();
    let ids: Vec<&str> = root["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["id"].as_str())
        .collect();
    assert_eq!(ids, ["v2.0", "v3.0"]);
    for path in ["/volume/v3", "/volume/v3/"] {
        let v = c.get(path).json();
        let v3 = &v["versions"][0];
        assert_eq!(
            (v3["id"].as_str(), v3["status"].as_str()),
            (Some("v3.0"), Some("CURRENT"))
        );
        assert_eq!(
            (v3["version"].as_str(), v3["min_version"].as_str()),
            (Some("3.3"), Some("3.0"))
        );
        assert!(v3["links"].to_string().contains("/volume/v3/"), "{v}");
    }
    assert_eq!(c.get("/volume/v2").json()["versions"][0]["id"], "v2.0");
    // Keystone keeps the unprefixed `/v3`.
    assert_eq!(c.get("/v3").json()["version"]["id"], "v3.14");
    let cat = c.request("GET", "/v3/auth/catalog", &[("X-Auth-Token", &token)], None);
    let cat = cat.json();
    for (ty, ver) in [
        ("block-storage", "v3"),
        ("volumev3", "v3"),
        ("volumev2", "v2"),
    ] {
        let e = cat["catalog"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == ty)
            .unwrap_or_else(|| panic!("no {ty} in {cat}"));
        let url = e["endpoints"][0]["url"].as_str().unwrap();
        assert!(url.ends_with(&format!("/volume/{ver}/{project}")), "{url}");
    }

    // Faults: wrong project, no token, unknown volume, bad bodies, bad microversion.
    let other = Api {
        project: NO_SUCH.into(),
        ..Api {
            c: &c,
            token: token.clone(),
            project: String::new(),
            prefix: "/volume/v3",
        }
    };
    assert_eq!(
        fault(&other.get("/volumes"), 400, "badRequest"),
        "Malformed request url"
    );
    let r = c.request("GET", &api.path("/volumes"), &[], None);
    fault(&r, 401, "unauthorized");
    assert_eq!(
        fault(
            &api.get(&format!("/volumes/{NO_SUCH}")),
            404,
            "itemNotFound"
        ),
        format!("Volume {NO_SUCH} could not be found.")
    );
    let before = api.get("/volumes").json()["volumes"]
        .as_array()
        .unwrap()
        .len();
    for body in [
        json!({}),
        json!({"volume": {"size": 0}}),
        json!({"volume": {"size": "x"}}),
        json!({"volume": {"size": 1, "bogus": true}}),
        json!({"volume": {"size": 1, "multiattach": "yes"}}),
        json!({"volume": {"size": 1, "metadata": {"k": 1}}}),
    ] {
        fault(
            &api.call("POST", "/volumes", Some(&body)),
            400,
            "badRequest",
        );
    }
    let r = c.request(
        "POST",
        &api.path("/volumes"),
        &[("X-Auth-Token", &token)],
        Some(("text/plain", "size=1")),
    );
    fault(&r, 415, "badMediaType");
    assert_eq!(
        fault(
            &api.call(
                "POST",
                "/volumes",
                Some(&json!({"volume": {"size": 1, "imageRef": NO_SUCH}}))
            ),
            404,
            "itemNotFound"
        ),
        format!("Image {NO_SUCH} could not be found.")
    );
    assert_eq!(
        fault(
            &api.call(
                "POST",
                "/volumes",
                Some(&json!({"volume": {"size": 1, "snapshot_id": NO_SUCH}}))
            ),
            404,
            "itemNotFound"
        ),
        format!("Snapshot {NO_SUCH} could not be found.")
    );
    // Refused requests made nothing.
    assert_eq!(
        api.get("/volumes").json()["volumes"]
            .as_array()
            .unwrap()
            .len(),
        before
    );
    let r = c.request(
        "GET",
        &api.path("/volumes"),
        &[
            ("X-Auth-Token", &token),
            ("OpenStack-API-Version", "volume 3.5"),
        ],
        None,
    );
    fault(&r, 406, "computeFault");
    let r = c.request(
        "GET",
        &api.path("/volumes"),
        &[
            ("X-Auth-Token", &token),
            ("OpenStack-API-Version", "volume 3.0"),
        ],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("openstack-api-version"), Some("volume 3.0"));

    // Create (202, detail view), also through v2 and the unprefixed paths.
    let mut ids = Vec::new();
    for (prefix, name) in [("/volume/v3", "b"), ("/volume/v2", "a"), ("/v3", "c")] {
        let p = Api {
            prefix,
            ..Api {
                c: &c,
                token: token.clone(),
                project: project.clone(),
                prefix: "",
            }
        };
        let r = p.call(
            "POST",
            "/volumes",
            Some(&json!({"volume": {"size": 1, "name": name, "metadata": {"n": name}}})),
        );
        assert_eq!(r.status, 202, "{}", r.body);
        let v = &r.json()["volume"];
        assert_eq!(
            (v["status"].as_str(), v["bootable"].as_str()),
            (Some("available"), Some("false"))
        );
        assert_eq!(
            v["os-vol-tenant-attr:tenant_id"],
            project.as_str(),
            "admin extras: {v}"
        );
        let self_link = v["links"][0]["href"].as_str().unwrap();
        assert!(
            self_link.contains(&format!("{prefix}/{project}/volumes/")),
            "{self_link}"
        );
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    // Paging by name, two at a time, following `next`.
    let r = api.get("/volumes/detail?sort=name:asc&limit=2").json();
    let names: Vec<&str> = r["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let next = r["volumes_links"][0]["href"].as_str().expect("next link");
    let next = next.split_once("/volume/v3").unwrap().1;
    let r = c
        .request(
            "GET",
            &format!("/volume/v3{next}"),
            &[("X-Auth-Token", &token)],
            None,
        )
        .json();
    let names: Vec<&str> = r["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["c"]);
    assert!(r.get("volumes_links").is_none(), "{r}");
    fault(
        &api.get(&format!("/volumes?marker={NO_SUCH}")),
        400,
        "badRequest",
    );
    fault(&api.get("/volumes?sort=nope"), 400, "badRequest");
    // Summary view, and filters.
    let r = api.get("/volumes?name=b").json();
    assert_eq!(r["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(r["volumes"][0]["id"], ids[0].as_str());
    assert!(r["volumes"][0].get("status").is_none(), "summary view: {r}");
    let r = api
        .get("/volumes/detail?metadata=%7B%22n%22%3A%22c%22%7D")
        .json();
    assert_eq!(r["volumes"][0]["name"], "c", "{r}");

    // Metadata, item by item.
    let m = format!("/volumes/{}/metadata", ids[0]);
    let r = api.call("POST", &m, Some(&json!({"metadata": {"x": "1"}})));
    assert_eq!(r.json()["metadata"], json!({"n": "b", "x": "1"}));
    let r = api.call("PUT", &m, Some(&json!({"metadata": {"y": "2"}})));
    assert_eq!(r.json()["metadata"], json!({"y": "2"}));
    assert_eq!(api.get(&format!("{m}/y")).json()["meta"], json!({"y": "2"}));
    fault(&api.get(&format!("{m}/x")), 404, "itemNotFound");
    let r = api.call("PUT", &format!("{m}/z"), Some(&json!({"meta": {"w": "3"}})));
    assert_eq!(
        fault(&r, 400, "badRequest"),
        "Request body and URI mismatch"
    );
    let r = api.call(
        "PUT",
        &format!("{m}/z"),
        Some(&json!({"meta": {"z": "3", "w": "4"}})),
    );
    assert_eq!(
        fault(&r, 400, "badRequest"),
        "Request body contains too many items"
    );
    assert_eq!(
        api.call("PUT", &format!("{m}/z"), Some(&json!({"meta": {"z": "3"}})))
            .status,
        200
    );
    assert_eq!(api.call("DELETE", &format!("{m}/y"), None).status, 200);
    fault(
        &api.call("DELETE", &format!("{m}/y"), None),
        404,
        "itemNotFound",
    );
    assert_eq!(api.get(&m).json()["metadata"], json!({"z": "3"}));

    // Update and delete.
    let r = api.call(
        "PUT",
        &format!("/volumes/{}", ids[0]),
        Some(&json!({"volume": {"name": "renamed", "description": null}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["volume"]["name"], "renamed");
    fault(
        &api.call(
            "PUT",
            &format!("/volumes/{}", ids[0]),
            Some(&json!({"volume": {"size": 9}})),
        ),
        400,
        "badRequest",
    );
    for id in &ids {
        assert_eq!(
            api.call("DELETE", &format!("/volumes/{id}"), None).status,
            202
        );
    }
    fault(
        &api.call("DELETE", &format!("/volumes/{}", ids[0]), None),
        404,
        "itemNotFound",
    );
    fault(&api.call("PATCH", "/volumes", None), 405, "badMethod");
}

#[test]
fn actions_grow_online_flag_bootable_and_read_only_and_reset_status() {
    let c = daemon();
    let (token, project) = admin_token(&c, PW);
    let api = Api::new(&c, &token, &project, "/volume/v3");
    let v = osc(
        &c,
        &["volume", "create", "--size", "1", "-f", "json", "grow"],
    )
    .json();
    let id = v["id"].as_str().unwrap().to_owned();

    // Grown while available, with the CLI.
    let set = osc(&c, &["volume", "set", "--size", "2", "grow"]);
    assert!(set.ok, "{}", set.stderr);
    assert_eq!(
        osc(&c, &["volume", "show", "-f", "json", "grow"]).json()["size"],
        2
    );
    let action = |body: Value| api.call("POST", &format!("/volumes/{id}/action"), Some(&body));
    let m = fault(
        &action(json!({"os-extend": {"new_size": 2}})),
        400,
        "badRequest",
    );
    assert!(m.contains("must be greater than current size"), "{m}");
    fault(&action(json!({"os-extend": {}})), 400, "badRequest");
    assert_eq!(
        fault(&action(json!({"os-frobnicate": {}})), 400, "badRequest"),
        "There is no such action: os-frobnicate"
    );

    // Attached through Compute, it grows online: a new NBD connection sees the new size, and
    // the data written before is still there.
    let sid = server(&c, &token, &project);
    let uri = attach(&c, &token, &project, &sid, &id);
    let io = |cmd: &str| {
        run(std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd])
            .arg(&uri))
    };
    let w = io("write -P 0x6b 0 1M");
    assert!(
        w.ok && !w.stdout.contains("error"),
        "{}{}",
        w.stdout,
        w.stderr
    );
    assert_eq!(action(json!({"os-extend": {"new_size": "3"}})).status, 202);
    let size = run(std::process::Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(
        size.stdout.trim(),
        (3u64 << 30).to_string(),
        "{}",
        size.stderr
    );
    let r = io("read -P 0x6b 0 1M");
    assert!(
        r.ok && !r.stdout.contains("error") && !r.stdout.contains("fail"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(
        osc(&c, &["volume", "show", "-f", "json", "grow"]).json()["size"],
        3
    );

    // Read-only: the next connection refuses writes; read-write again: it writes.
    assert_eq!(
        action(json!({"os-update_readonly_flag": {"readonly": true}})).status,
        202
    );
    write_refused(&uri, "a read-only volume took a write");
    read_matches(&uri, "read -P 0x6b 0 4k");
    let set = osc(&c, &["volume", "set", "--read-write", "grow"]);
    assert!(set.ok, "{}", set.stderr);
    let w = io("write -P 0x22 0 4k");
    assert!(
        w.ok && !w.stdout.contains("error"),
        "{}{}",
        w.stdout,
        w.stderr
    );

    // Bootable, with the CLI; shown as cinder's string.
    let set = osc(&c, &["volume", "set", "--bootable", "grow"]);
    assert!(set.ok, "{}", set.stderr);
    assert_eq!(
        api.get(&format!("/volumes/{id}")).json()["volume"]["bootable"],
        "true"
    );

    // Reset status: admins only, any status, with cinderclient.
    let reset = cinder(&c, &["reset-state", "--state", "error", &id]);
    assert!(reset.ok, "{}", reset.stderr);
    assert_eq!(
        api.get(&format!("/volumes/{id}")).json()["volume"]["status"],
        "error"
    );
    assert_eq!(
        action(json!({"os-reset_status": {"status": "in-use"}})).status,
        202
    );
    fault(
        &action(json!({"os-reset_status": {"status": "sideways"}})),
        400,
        "badRequest",
    );
    assert_eq!(
        api.get(&format!("/volumes/{id}")).json()["volume"]["status"],
        "in-use"
    );
}

#[test]
fn snapshots_are_instants_and_volumes_clone_them_and_each_other() {
    let c = daemon();
    let (token, project) = admin_token(&c, PW);
    let api = Api::new(&c, &token, &project, "/volume/v3");
    // Attached, so that the data is written through its export, then snapshotted in use.
    let (vid, sid, uri) = attached_volume(&c, &token, &project, "orig");
    qemu_io(&uri, "write -P 0x41 0 1M");

    // In use: refused without --force, taken with it.
    let refused = osc(
        &c,
        &["volume", "snapshot", "create", "--volume", "orig", "s0"],
    );
    assert!(
        !refused.ok && refused.stderr.contains("in-use"),
        "{}",
        refused.stderr
    );
    let s = osc(
        &c,
        &[
            "volume", "snapshot", "create", "--volume", "orig", "--force", "-f", "json", "s1",
        ],
    )
    .json();
    assert_eq!(s["status"], "available", "{s}");
    assert_eq!(s["size"], 1);
    let snap = s["id"].as_str().unwrap().to_owned();
    // Written after the instant: in the volume, not in the snapshot.
    qemu_io(&uri, "write -P 0x42 0 1M");

    let list = osc(&c, &["volume", "snapshot", "list", "-f", "json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let shown = osc(&c, &["volume", "snapshot", "show", "-f", "json", "s1"]).json();
    assert_eq!(shown["volume_id"], vid.as_str());
    let set = osc(&c, &["volume", "snapshot", "set", "--name", "s1b", "s1"]);
    assert!(set.ok, "{}", set.stderr);

    // A volume from the snapshot (larger), and one cloned from the volume: instant, and each
    // reads what its source held at its instant.
    let from_snap = osc(
        &c,
        &[
            "volume",
            "create",
            "--snapshot",
            "s1b",
            "--size",
            "2",
            "-f",
            "json",
            "fromsnap",
        ],
    )
    .json();
    assert_eq!(from_snap["status"], "available", "{from_snap}");
    assert_eq!(from_snap["snapshot_id"], snap.as_str());
    let from_vol = osc(
        &c,
        &[
            "volume", "create", "--source", "orig", "-f", "json", "fromvol",
        ],
    )
    .json();
    assert_eq!(
        (from_vol["status"].as_str(), from_vol["size"].as_u64()),
        (Some("available"), Some(1))
    );
    assert_eq!(from_vol["source_volid"], vid.as_str());
    let small = api.call(
        "POST",
        "/volumes",
        Some(&json!({"volume": {"size": 1, "snapshot_id": snap, "name": "x"}})),
    );
    assert_eq!(small.status, 202, "{}", small.body); // equal size is fine
    let small_id = small.json()["volume"]["id"].as_str().unwrap().to_owned();
    for (name, pattern) in [("fromsnap", "0x41"), ("fromvol", "0x42")] {
        let id = osc(&c, &["volume", "show", "-f", "value", "-c", "id", name]);
        let id = id.stdout.trim().to_owned();
        let u = attach(&c, &token, &project, &sid, &id);
        qemu_io(&u, &format!("read -P {pattern} 0 1M"));
        qemu_io(&u, "read -P 0 1M 1M");
        // Its writes are its own.
        qemu_io(&u, "write -P 0x55 0 4k");
    }
    qemu_io(&uri, "read -P 0x42 0 1M");

    // A volume with snapshots is not deleted; without them it is.
    let r = c.request(
        "DELETE",
        &format!("/compute/v2.1/{project}/servers/{sid}/os-volume_attachments/{vid}"),
        &[("X-Auth-Token", &token)],
        None,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let m = fault(
        &api.call("DELETE", &format!("/volumes/{vid}"), None),
        400,
        "badRequest",
    );
    assert!(m.starts_with("Invalid volume"), "{m}");
    let del = osc(&c, &["volume", "snapshot", "delete", "s1b"]);
    assert!(del.ok, "{}", del.stderr);
    fault(&api.get(&format!("/snapshots/{snap}")), 404, "itemNotFound");
    // The volume made from it lives on.
    assert_eq!(
        api.get(&format!("/volumes/{small_id}")).json()["volume"]["status"],
        "available"
    );
    assert_eq!(
        api.call("DELETE", &format!("/volumes/{vid}"), None).status,
        202
    );

    // Snapshot errors, in cinder's format.
    for body in [
        json!({}),
        json!({"snapshot": {}}),
        json!({"snapshot": {"volume_id": small_id, "force": "maybe"}}),
        json!({"snapshot": {"volume_id": small_id, "bogus": 1}}),
    ] {
        fault(
            &api.call("POST", "/snapshots", Some(&body)),
            400,
            "badRequest",
        );
    }
    fault(
        &api.call(
            "POST",
            "/snapshots",
            Some(&json!({"snapshot": {"volume_id": NO_SUCH}})),
        ),
        404,
        "itemNotFound",
    );
    fault(
        &api.get(&format!("/snapshots/{NO_SUCH}")),
        404,
        "itemNotFound",
    );
}

#[test]
fn volume_types_limits_and_zones() {
    let c = daemon();
    let (token, project) = admin_token(&c, PW);
    let api = Api::new(&c, &token, &project, "/volume/v3");
    let types = osc(&c, &["volume", "type", "list", "-f", "json"]).json();
    let names: Vec<&str> = types
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["Name"].as_str())
        .collect();
    assert_eq!(names, ["__DEFAULT__"]);
    assert_eq!(
        api.get("/types/default").json()["volume_type"]["name"],
        "__DEFAULT__"
    );

    let made = osc(
        &c,
        &[
            "volume",
            "type",
            "create",
            "--description",
            "ssd",
            "--property",
            "tier=1",
            "-f",
            "json",
            "fast",
        ],
    )
    .json();
    assert_eq!(made["name"], "fast", "{made}");
    let dup = osc(&c, &["volume", "type", "create", "fast"]);
    assert!(!dup.ok, "a second type of the same name");
    let set = osc(&c, &["volume", "type", "set", "--name", "faster", "fast"]);
    assert!(set.ok, "{}", set.stderr);
    let shown = osc(&c, &["volume", "type", "show", "-f", "json", "faster"]).json();
    assert_eq!(shown["description"], "ssd", "{shown}");
    assert_eq!(shown["properties"], json!({"tier": "1"}), "{shown}");

    // A type in use is kept; the default type always.
    let v = osc(
        &c,
        &[
            "volume", "create", "--size", "1", "--type", "faster", "-f", "json", "t1",
        ],
    )
    .json();
    assert_eq!(v["type"], "faster", "{v}");
    let del = osc(&c, &["volume", "type", "delete", "faster"]);
    assert!(
        !del.ok && del.stderr.contains("still in use"),
        "{}",
        del.stderr
    );
    let m = fault(
        &api.call("DELETE", "/types/default", None),
        400,
        "badRequest",
    );
    assert!(m.contains("Default volume type can not be deleted"), "{m}");
    assert!(osc(&c, &["volume", "delete", "t1"]).ok);
    assert!(osc(&c, &["volume", "type", "delete", "faster"]).ok);
    fault(&api.get("/types/faster"), 404, "itemNotFound");
    fault(
        &api.call(
            "POST",
            "/types",
            Some(&json!({"volume_type": {"name": " "}})),
        ),
        400,
        "badRequest",
    );

    // Limits: no quotas, and what the project holds.
    let v = osc(
        &c,
        &["volume", "create", "--size", "3", "-f", "json", "held"],
    )
    .json();
    assert_eq!(v["status"], "available");
    let lim = api.get("/limits").json();
    let abs = &lim["limits"]["absolute"];
    assert_eq!(
        (
            abs["totalVolumesUsed"].as_u64(),
            abs["totalGigabytesUsed"].as_u64()
        ),
        (Some(1), Some(3)),
        "{lim}"
    );
    assert_eq!(abs["maxTotalVolumes"], -1);
    let shown = cinder(&c, &["absolute-limits"]);
    assert!(
        shown.ok && shown.stdout.contains("totalGigabytesUsed"),
        "{}{}",
        shown.stdout,
        shown.stderr
    );

    let zones = osc(
        &c,
        &["availability", "zone", "list", "--volume", "-f", "json"],
    )
    .json();
    assert_eq!(zones[0]["Zone Name"], "nova", "{zones}");
}

#[test]
fn upload_to_image_streams_a_point_in_time_copy_and_checks_every_seed_row() {
    let c = daemon();
    let (token, project) = admin_token(&c, PW);
    let api = Api::new(&c, &token, &project, "/v2");
    let (vid, sid, uri) = attached_volume(&c, &token, &project, "src");
    let io = |cmd: &str| qemu_io(&uri, cmd);
    io("write -P 0x31 0 1M");
    io("write -P 0x32 512M 1M");
    let images_before = api
        .c
        .request("GET", "/v2/images", &[("X-Auth-Token", &token)], None)
        .json()["images"]
        .as_array()
        .unwrap()
        .len();
    let action = |body: Value| api.call("POST", &format!("/volumes/{vid}/action"), Some(&body));

    // Every 400 row of seed 003's table, and nothing changes.
    let r = api.c.request(
        "POST",
        &api.path(&format!("/volumes/{vid}/action")),
        &[("X-Auth-Token", &token)],
        None,
    );
    fault(&r, 400, "badRequest");
    fault(&action(json!({"os-other": {}})), 400, "badRequest");
    for name in [json!(null), json!(0), json!(""), json!(false)] {
        let m = fault(
            &action(json!({"os-volume_upload_image": {"image_name": name}})),
            400,
            "badRequest",
        );
        assert_eq!(m, "No image_name was specified in request.");
    }
    fault(
        &action(json!({"os-volume_upload_image": {}})),
        400,
        "badRequest",
    );
    fault(
        &action(json!({"os-volume_upload_image": {"image_name": "x".repeat(256)}})),
        400,
        "badRequest",
    );
    assert_eq!(
        fault(
            &action(json!({"os-volume_upload_image": {"image_name": "i", "force": 5}})),
            400,
            "badRequest"
        ),
        "'force' is not string or bool."
    );
    fault(
        &action(json!({"os-volume_upload_image": {"image_name": "i", "container_format": "box"}})),
        400,
        "badRequest",
    );
    fault(
        &action(json!({"os-volume_upload_image": {"image_name": "i", "disk_format": "floppy"}})),
        400,
        "badRequest",
    );
    assert_eq!(
        fault(
            &action(json!({"os-volume_upload_image": {"image_name": "i"}})),
            400,
            "badRequest"
        ),
        "Invalid volume: Volume status is in-use."
    );
    let other = Api {
        project: NO_SUCH.into(),
        ..Api {
            c: &c,
            token: token.clone(),
            project: String::new(),
            prefix: "/v2",
        }
    };
    assert_eq!(
        fault(
            &other.call(
                "POST",
                &format!("/volumes/{vid}/action"),
                Some(&json!({"os-volume_upload_image": {"image_name": "i"}}))
            ),
            400,
            "badRequest"
        ),
        "Malformed request url"
    );
    fault(
        &api.call(
            "POST",
            &format!("/volumes/{NO_SUCH}/action"),
            Some(&json!({"os-volume_upload_image": {"image_name": "i", "force": true}})),
        ),
        404,
        "itemNotFound",
    );
    let r = c.request(
        "POST",
        &format!("/v2//volumes/{vid}/action"),
        &[("X-Auth-Token", &token)],
        Some(("application/json", "{}")),
    );
    assert!(
        r.status == 404 || r.status == 400,
        "empty tenant: {}",
        r.status
    );
    // iso: accepted, and no image is made.
    let r = action(
        json!({"os-volume_upload_image": {"image_name": "i", "disk_format": "iso", "force": true}}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.json()["os-volume_upload_image"]["image_id"].is_null());
    let now = api
        .c
        .request("GET", "/v2/images", &[("X-Auth-Token", &token)], None)
        .json();
    assert_eq!(now["images"].as_array().unwrap().len(), images_before);
    assert_eq!(
        api.get(&format!("/volumes/{vid}")).json()["volume"]["status"],
        "in-use"
    );

    // Forced: 202 with the seed's body; the image holds the volume as it was at the 202.
    let r = action(json!({"os-volume_upload_image": {"image_name": "snapimg", "force": "True"}}));
    assert_eq!(r.status, 202, "{}", r.body);
    let up = r.json()["os-volume_upload_image"].clone();
    assert_eq!(up["status"], "uploading", "{up}");
    assert_eq!(
        (up["disk_format"].as_str(), up["container_format"].as_str()),
        (Some("raw"), Some("bare"))
    );
    assert_eq!(
        (up["size"].as_u64(), up["image_name"].as_str()),
        (Some(1), Some("snapimg"))
    );
    let image = up["image_id"].as_str().expect("image id").to_owned();
    io("write -P 0x33 0 1M"); // after the instant: not in the image
    let i = wait_upload(&c, &token, &project, &vid, &image);
    assert_eq!(i["size"], 1u64 << 30, "{i}");
    assert_eq!(
        api.get(&format!("/volumes/{vid}")).json()["volume"]["status"],
        "in-use"
    );
    let dir = common::temp_dir();
    let file = dir.path().join("img.raw");
    let saved = osc(
        &c,
        &["image", "save", "--file", file.to_str().unwrap(), &image],
    );
    assert!(saved.ok, "{}", saved.stderr);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 30);
    let check = |off: u64, want: u8| {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 1 << 20];
        std::fs::File::open(&file)
            .unwrap()
            .read_exact_at(&mut buf, off)
            .unwrap();
        assert!(buf.iter().all(|&b| b == want), "at {off}: want {want:#x}");
    };
    check(0, 0x31);
    check(512 << 20, 0x32);
    check(100 << 20, 0);

    // The CLI way, detached: `openstack image create --volume`.
    let r = c.request(
        "DELETE",
        &format!("/compute/v2.1/{project}/servers/{sid}/os-volume_attachments/{vid}"),
        &[("X-Auth-Token", &token)],
        None,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let made = osc(
        &c,
        &["image", "create", "--volume", "src", "-f", "json", "cliimg"],
    );
    assert!(made.ok, "{}{}", made.stdout, made.stderr);
    // A volume that is not available or in-use is refused.
    let reset = cinder(&c, &["reset-state", "--state", "error", &vid]);
    assert!(reset.ok, "{}", reset.stderr);
    assert_eq!(
        fault(
            &action(json!({"os-volume_upload_image": {"image_name": "i", "force": true}})),
            400,
            "badRequest"
        ),
        "Invalid volume: Volume status must be available/in-use."
    );
}

#[test]
fn an_upload_cut_by_a_crash_resumes_after_the_restart() {
    let gate_dir = common::temp_dir();
    let gate = gate_dir.path().join("go");
    let data = common::temp_dir();
    let mut c = Serve::new()
        .data_dir(data.path())
        .arg("--admin-password")
        .arg(PW)
        .env("CAIRN_UPLOAD_GATE", &gate)
        .start();
    let (token, project) = admin_token(&c, PW);
    let api = Api::new(&c, &token, &project, "/volume/v3");
    let r = api.call(
        "POST",
        "/volumes",
        Some(&json!({"volume": {"size": 1, "name": "u"}})),
    );
    let vid = r.json()["volume"]["id"].as_str().unwrap().to_owned();
    let sid = server(&c, &token, &project);
    let uri = attach(&c, &token, &project, &sid, &vid);
    let w = run(std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 4M 1M"])
        .arg(&uri));
    assert!(w.ok, "{}", w.stderr);
    let r = api.call(
        "POST",
        &format!("/volumes/{vid}/action"),
        Some(&json!({"os-volume_upload_image": {"image_name": "cut", "force": true}})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let image = r.json()["os-volume_upload_image"]["image_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_at_gate(&c, &gate);
    assert_eq!(
        api.get(&format!("/volumes/{vid}")).json()["volume"]["status"],
        "uploading"
    );
    // The volume, its point-in-time copy; the image has no data yet.
    assert_eq!(metric(&c, "cairn_store_objects"), 2.0);
    c.stop_with(libc::SIGKILL);

    let c = Serve::new()
        .data_dir(data.path())
        .arg("--admin-password")
        .arg(PW)
        .start();
    let (token, _) = admin_token(&c, PW);
    wait_upload(&c, &token, &project, &vid, &image);
    let v = c
        .request(
            "GET",
            &format!("/volume/v3/{project}/volumes/{vid}"),
            &[("X-Auth-Token", &token)],
            None,
        )
        .json();
    assert_eq!(v["volume"]["status"], "in-use", "{v}");
    let dir = common::temp_dir();
    let file = dir.path().join("cut.raw");
    let saved = osc(
        &c,
        &["image", "save", "--file", file.to_str().unwrap(), &image],
    );
    assert!(saved.ok, "{}", saved.stderr);
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    std::fs::File::open(&file)
        .unwrap()
        .read_exact_at(&mut buf, 4 << 20)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0x77));
    // The copy went: the volume and the image's data remain.
    assert_eq!(metric(&c, "cairn_store_objects"), 2.0);
}

#[test]
fn qcow2_uploads_are_valid_images_holding_only_the_data() {
    let c = daemon();
    let (token, project) = admin_token(&c, PW);
    let (vid, _sid, uri) = attached_volume(&c, &token, &project, "q");
    qemu_io(&uri, "write -P 0x51 0 1M");
    qemu_io(&uri, "write -P 0x52 700M 4k"); // a lone block in a cluster of its own
    qemu_io(&uri, "write -P 0x53 1023M 1M"); // the last region
    let physical = metric(&c, "cairn_store_physical_bytes");
    let image = cinder_upload(&c, &vid, "qcow2", "qimg");
    let i = wait_upload(&c, &token, &project, &vid, &image);
    // Into the daemon's own images the data clusters are the volume's chunks, shared: the
    // upload wrote its metadata (header, refcounts, L1, three L2 tables), no data.
    let grown = metric(&c, "cairn_store_physical_bytes") - physical;
    assert!(grown <= (8 << 16) as f64, "the upload stored {grown} bytes");
    assert_eq!(i["disk_format"], "qcow2", "{i}");
    assert_eq!(i["virtual_size"], 1u64 << 30, "{i}");
    let dir = common::temp_dir();
    let file = dir.path().join("img.qcow2");
    let saved = osc(
        &c,
        &["image", "save", "--file", file.to_str().unwrap(), &image],
    );
    assert!(saved.ok, "{}", saved.stderr);
    // Holes cost nothing: 2 MiB and a block of data, a few clusters of metadata.
    let len = std::fs::metadata(&file).unwrap().len();
    assert!(len < 4 << 20, "{len} bytes");
    let check = run(std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&file));
    assert!(
        check.ok && check.stdout.contains("No errors"),
        "{}{}",
        check.stdout,
        check.stderr
    );
    let cmp = run(std::process::Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&file)
        .arg(&uri));
    assert!(cmp.ok, "{}{}", cmp.stdout, cmp.stderr);

    let qcow2_image = i.clone();
    // vdi: written by qemu-img from the volume's copy into the scratch space, then sent.
    let image = cinder_upload(&c, &vid, "vdi", "vimg");
    let i = wait_upload(&c, &token, &project, &vid, &image);
    assert_eq!(i["disk_format"], "vdi", "{i}");
    let file = dir.path().join("img.vdi");
    let saved = osc(
        &c,
        &["image", "save", "--file", file.to_str().unwrap(), &image],
    );
    assert!(saved.ok, "{}", saved.stderr);
    let cmp = run(std::process::Command::new("qemu-img")
        .args(["compare", "-f", "vdi", "-F", "raw"])
        .arg(&file)
        .arg(&uri));
    assert!(cmp.ok, "{}{}", cmp.stdout, cmp.stderr);
    let scratch = std::fs::read_dir(c.data_dir().join("tmp")).unwrap().count();
    assert_eq!(scratch, 0, "the scratch file is gone");

    // And back: `openstack volume create --image` of the qcow2 holds the volume's data.
    let made = osc(
        &c,
        &[
            "volume", "create", "--image", "qimg", "--size", "2", "-f", "json", "fromq",
        ],
    );
    assert!(made.ok, "{}{}", made.stdout, made.stderr);
    let fid = made.json()["id"].as_str().expect("volume id").to_owned();
    let v = eventually(|| {
        let v = osc(&c, &["volume", "show", "-f", "json", &fid]).json();
        match v["status"].as_str() {
            Some("available") => Ok(v),
            Some("error") => panic!("{v}\n{}", c.logs.text()),
            _ => Err(format!("{v}\n{}", c.logs.text())),
        }
    });
    assert_eq!(v["bootable"], true, "{v}");
    assert_eq!(v["size"], 2, "{v}");
    // What cinder records of the image, carried to clones (bootable too).
    let m = &v["volume_image_metadata"];
    assert_eq!(m["image_name"], "qimg", "{v}");
    assert_eq!(m["disk_format"], "qcow2", "{v}");
    assert_eq!(m["container_format"], "bare", "{v}");
    assert_eq!(m["checksum"], qcow2_image["checksum"], "{v}");
    assert_eq!(m["size"], qcow2_image["size"].to_string().as_str(), "{v}");
    let clone = osc(
        &c,
        &["volume", "create", "--source", "fromq", "-f", "json", "cq"],
    );
    assert!(clone.ok, "{}", clone.stderr);
    let cid = clone.json()["id"].as_str().expect("id").to_owned();
    let cv = osc(&c, &["volume", "show", "-f", "json", &cid]).json();
    assert_eq!(cv["volume_image_metadata"], *m, "{cv}");
    assert_eq!(cv["bootable"], true, "{cv}");
    let sid = server(&c, &token, &project);
    let from = attach(&c, &token, &project, &sid, &fid);
    let cmp = run(std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&from)
        .arg(&uri));
    // The new volume is 2 GiB: compare's "different size" rule needs the extra GiB zero.
    assert!(cmp.ok, "{}{}", cmp.stdout, cmp.stderr);
}

/// `--image-service-url`: uploads go to an external image service, here a second cairn
/// daemon that checks this one's tokens (`--identity-url`), called with the caller's token.
/// raw and qcow2 are streamed, vmdk goes through `qemu-img`; each image reads back equal to
/// the volume, owned by the caller's project, with the hashes the service computed. A
/// service that cannot be reached is seed 003's 500, and the refused upload changes nothing.
#[test]
fn uploads_reach_an_external_image_service_with_the_callers_token() {
    let (pa, pb) = (common::free_port(), common::free_port());
    let a_url = format!("http://127.0.0.1:{pa}");
    let b = Serve::new()
        .arg("--admin-password")
        .arg("image-side-pw")
        .http_port(pb)
        .arg("--identity-url")
        .arg(format!("{a_url}/identity"))
        .start();
    let a = Serve::new()
        .arg("--admin-password")
        .arg(PW)
        .http_port(pa)
        .arg("--image-service-url")
        .arg(b.url("/image"))
        .start();
    let (token, project) = admin_token(&a, PW);
    let (vid, _sid, uri) = attached_volume(&a, &token, &project, "ext");
    qemu_io(&uri, "write -P 0x61 0 3M");
    qemu_io(&uri, "write -P 0x62 900M 64k");
    let dir = common::temp_dir();
    let on_b = |image: &str| {
        let get = |c: &Cairn, path: String| {
            c.request("GET", &path, &[("X-Auth-Token", &token)], None)
                .json()
        };
        eventually(|| {
            let i = get(&b, format!("/v2/images/{image}"));
            let v = get(&a, format!("/volume/v3/{project}/volumes/{vid}"));
            if i["status"] == "active" && v["volume"]["status"] == "in-use" {
                Ok(i)
            } else {
                Err(format!("upload not done: {i}\n{v}\n{}", a.logs.text()))
            }
        })
    };
    for format in ["raw", "qcow2", "vmdk"] {
        let image = cinder_upload(&a, &vid, format, &format!("ext-{format}"));
        let i = on_b(&image);
        assert_eq!(
            i["owner"],
            project.as_str(),
            "the caller's project owns it: {i}"
        );
        assert_eq!(i["disk_format"], format, "{i}");
        // Not in this daemon's own images.
        let own = a.request(
            "GET",
            &format!("/v2/images/{image}"),
            &[("X-Auth-Token", &token)],
            None,
        );
        assert_eq!(own.status, 404, "{}", own.body);
        let file = dir.path().join(format!("img.{format}"));
        let got = run(std::process::Command::new("curl")
            .args(["-sSf", "-H", &format!("X-Auth-Token: {token}"), "-o"])
            .arg(&file)
            .arg(b.url(&format!("/v2/images/{image}/file"))));
        assert!(got.ok, "{}", got.stderr);
        let md5 = run(std::process::Command::new("md5sum").arg(&file));
        assert_eq!(
            md5.stdout.split_whitespace().next(),
            i["checksum"].as_str(),
            "the service's md5 is the data's"
        );
        let cmp = run(std::process::Command::new("qemu-img")
            .args(["compare", "-f", format, "-F", "raw"])
            .arg(&file)
            .arg(&uri));
        assert!(cmp.ok, "{format}: {}{}", cmp.stdout, cmp.stderr);
    }

    // The image side takes A's callers for all of its APIs: a volume of A's project there
    // (their project and user are recorded on first sight, as Keystone's shadow users).
    let r = b.request(
        "POST",
        &format!("/v3/{project}/volumes"),
        &[("X-Auth-Token", &token)],
        Some((
            "application/json",
            r#"{"volume": {"size": 1, "name": "on-b"}}"#,
        )),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        r.json()["volume"]["os-vol-tenant-attr:tenant_id"],
        project.as_str()
    );

    // An image service that is not there: 500, as seed 003 says, and nothing changed.
    let c = Serve::new()
        .arg("--admin-password")
        .arg(PW)
        .arg("--image-service-url")
        .arg(format!("http://127.0.0.1:{}/image", common::free_port()))
        .start();
    let (token, project) = admin_token(&c, PW);
    let v = osc(
        &c,
        &["volume", "create", "--size", "1", "-f", "json", "lonely"],
    )
    .json();
    let vid = v["id"].as_str().expect("volume id");
    let objects = metric(&c, "cairn_store_objects");
    let r = c.request(
        "POST",
        &format!("/v3/{project}/volumes/{vid}/action"),
        &[("X-Auth-Token", &token)],
        Some((
            "application/json",
            &json!({"os-volume_upload_image": {"image_name": "nowhere"}}).to_string(),
        )),
    );
    let m = fault(&r, 500, "computeFault");
    assert!(
        m.contains("Failed to communicate with the image service"),
        "{m}"
    );
    let v = osc(&c, &["volume", "show", "-f", "json", vid]).json();
    assert_eq!(v["status"], "available", "{v}");
    assert_eq!(
        metric(&c, "cairn_store_objects"),
        objects,
        "the copy is gone"
    );
}

/// A real Glance (PyPI's, file store, no auth, under gunicorn) on loopback, stopped on drop.
/// No auth means no roles: the policy's new defaults would refuse everything, so they are off.
struct Glance {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Glance {
    fn start() -> Glance {
        let venv = std::env::var_os("CAIRN_GLANCE_VENV")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/cairn/glance-venv")
            });
        let bin = |n: &str| {
            let b = venv.join("bin").join(n);
            assert!(
                b.is_file(),
                "{} is missing: run scripts/setup-test-deps",
                b.display()
            );
            b
        };
        let dir = common::temp_dir();
        let d = dir.path().to_owned();
        let d = d.as_path();
        for sub in ["images", "staging", "tasks"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        std::fs::copy(
            venv.join("etc/glance/glance-api-paste.ini"),
            d.join("glance-api-paste.ini"),
        )
        .unwrap();
        let port = common::free_port();
        let conf = format!(
            "[DEFAULT]\nenabled_backends = fs:file\n\
             [glance_store]\ndefault_backend = fs\n\
             [fs]\nfilesystem_store_datadir = {d}/images\n\
             [os_glance_staging_store]\nfilesystem_store_datadir = {d}/staging\n\
             [os_glance_tasks_store]\nfilesystem_store_datadir = {d}/tasks\n\
             [database]\nconnection = sqlite:///{d}/glance.sqlite\n\
             [paste_deploy]\nflavor =\nconfig_file = {d}/glance-api-paste.ini\n\
             [oslo_policy]\nenforce_new_defaults = false\nenforce_scope = false\n",
            d = d.display()
        );
        std::fs::write(d.join("glance-api.conf"), conf).unwrap();
        let sync = run(std::process::Command::new(bin("glance-manage"))
            .arg("--config-file")
            .arg(d.join("glance-api.conf"))
            .arg("db_sync"));
        assert!(sync.ok, "glance-manage db_sync: {}", sync.stderr);
        let child = std::process::Command::new(bin("gunicorn"))
            .args([
                "-w",
                "1",
                "--graceful-timeout",
                "2",
                "--no-control-socket",
                "-b",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .arg("glance.wsgi.api:application")
            .env("OS_GLANCE_CONFIG_DIR", d)
            .current_dir(d)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(d.join("api.log")).unwrap())
            .spawn()
            .expect("gunicorn");
        let g = Glance {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        // Ready when it lists images (gunicorn binds before the app has loaded).
        eventually(|| {
            common::http_get(&format!("{}/v2/images", g.url))
                .is_ok_and(|r| r.status == 200)
                .then_some(())
                .ok_or_else(|| {
                    let log = std::fs::read_to_string(d.join("api.log")).unwrap_or_default();
                    format!("glance did not start: {log}")
                })
        });
        g
    }

    fn image(&self, id: &str) -> Value {
        let r = common::http_get(&format!("{}/v2/images/{id}", self.url)).expect("glance");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }
}

impl Drop for Glance {
    fn drop(&mut self) {
        // SIGTERM: gunicorn's master stops its worker too (SIGKILL would orphan it).
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The same uploads against a real Glance (33.0.0 from PyPI, no auth): raw and qcow2
/// streamed in one chunked PUT each, vmdk written by qemu-img first; Glance stores what
/// the volume holds, with the md5 it computed itself.
#[test]
fn uploads_reach_a_real_glance() {
    let glance = Glance::start();
    let c = Serve::new()
        .arg("--admin-password")
        .arg(PW)
        .arg("--image-service-url")
        .arg(&glance.url)
        .start();
    let (token, project) = admin_token(&c, PW);
    let (vid, _sid, uri) = attached_volume(&c, &token, &project, "g");
    qemu_io(&uri, "write -P 0x71 0 2M");
    qemu_io(&uri, "write -P 0x72 600M 192k");
    let dir = common::temp_dir();
    for format in ["raw", "qcow2", "vmdk"] {
        let image = cinder_upload(&c, &vid, format, "g");
        let i = eventually(|| {
            let i = glance.image(&image);
            let v = osc(&c, &["volume", "show", "-f", "json", &vid]).json();
            if i["status"] == "active" && v["status"] == "in-use" {
                Ok(i)
            } else {
                Err(format!("{i}\n{v}\n{}", c.logs.text()))
            }
        });
        assert_eq!(i["disk_format"], format, "{i}");
        let file = dir.path().join(format!("g.{format}"));
        let got = run(std::process::Command::new("curl")
            .args(["-sSf", "-o"])
            .arg(&file)
            .arg(format!("{}/v2/images/{image}/file", glance.url)));
        assert!(got.ok, "{}", got.stderr);
        let md5 = run(std::process::Command::new("md5sum").arg(&file));
        assert_eq!(md5.stdout.split_whitespace().next(), i["checksum"].as_str());
        let cmp = run(std::process::Command::new("qemu-img")
            .args(["compare", "-f", format, "-F", "raw"])
            .arg(&file)
            .arg(&uri));
        assert!(cmp.ok, "{format}: {}{}", cmp.stdout, cmp.stderr);
    }
}

/// An upload to an external image service cut by a crash cannot resume (the caller's token
/// went with the process): the restart restores the volume, drops the copy and says so;
/// the image there stays queued.
#[test]
fn an_external_upload_cut_by_a_crash_ends_cleanly() {
    let gate_dir = common::temp_dir();
    let gate = gate_dir.path().join("go");
    let (pa, pb) = (common::free_port(), common::free_port());
    let b = Serve::new()
        .arg("--admin-password")
        .arg("image-side-pw")
        .http_port(pb)
        .arg("--identity-url")
        .arg(format!("http://127.0.0.1:{pa}/identity"))
        .start();
    let data = common::temp_dir();
    let a = |gated: bool| {
        let s = Serve::new()
            .data_dir(data.path())
            .http_port(pa)
            .arg("--admin-password")
            .arg(PW)
            .arg("--image-service-url")
            .arg(b.url("/image"));
        if gated {
            s.env("CAIRN_UPLOAD_GATE", &gate).start()
        } else {
            s.start()
        }
    };
    let mut c = a(true);
    let (token, project) = admin_token(&c, PW);
    let v = osc(
        &c,
        &["volume", "create", "--size", "1", "-f", "json", "cut"],
    )
    .json();
    let vid = v["id"].as_str().expect("volume id").to_owned();
    let r = c.request(
        "POST",
        &format!("/v3/{project}/volumes/{vid}/action"),
        &[("X-Auth-Token", &token)],
        Some((
            "application/json",
            &json!({"os-volume_upload_image": {"image_name": "cut"}}).to_string(),
        )),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let image = r.json()["os-volume_upload_image"]["image_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_at_gate(&c, &gate);
    assert_eq!(
        metric(&c, "cairn_store_objects"),
        2.0,
        "the volume and its copy"
    );
    c.stop_with(libc::SIGKILL);

    let c = a(false);
    let v = osc(&c, &["volume", "show", "-f", "json", &vid]).json();
    assert_eq!(v["status"], "available", "{v}");
    assert_eq!(metric(&c, "cairn_store_objects"), 1.0, "the copy went");
    assert!(c.logs.contains("cut by a restart"), "{}", c.logs.text());
    let (token, _) = admin_token(&c, PW);
    let i = b
        .request(
            "GET",
            &format!("/v2/images/{image}"),
            &[("X-Auth-Token", &token)],
            None,
        )
        .json();
    assert_eq!(i["status"], "queued", "{i}");
}

/// python-cinderclient's legacy attach flow (what nova called before cinder's attachments
/// API). `attach <volume> <server>`: reserve, unreserve, reserve, initialize_connection,
/// attach at /dev/vdc. `detach <volume> <attachment>`: begin_detaching, roll_detaching,
/// begin_detaching, terminate_connection, detach. Prints the volume's status after each
/// call, and what the calls returned.
const CINDERCLIENT_ATTACH_FLOW: &str = r#"
import json, sys
import openstack.config
from cinderclient.v3 import client

phase, vid, other = sys.argv[1:4]
session = openstack.config.OpenStackConfig().get_one(cloud="cairn").get_session()
cinder = client.Client(session=session)
out = {"status": []}
def step(name, call, *args):
    call(vid, *args)
    out["status"].append([name, cinder.volumes.get(vid).status])
connector = {"host": "hv1", "ip": "127.0.0.1", "initiator": None, "multipath": False}
if phase == "attach":
    step("reserve", cinder.volumes.reserve)
    step("unreserve", cinder.volumes.unreserve)
    step("reserve", cinder.volumes.reserve)
    out["connection_info"] = dict(cinder.volumes.initialize_connection(vid, connector))
    step("attach", cinder.volumes.attach, other, "/dev/vdc", "rw")
    out["attachments"] = cinder.volumes.get(vid).attachments
else:
    step("begin_detaching", cinder.volumes.begin_detaching)
    step("roll_detaching", cinder.volumes.roll_detaching)
    step("begin_detaching", cinder.volumes.begin_detaching)
    step("terminate_connection", cinder.volumes.terminate_connection, connector)
    step("detach", cinder.volumes.detach, other)
print(json.dumps(out))
"#;

/// An NBD connection (libnbd) to `argv[1]` that writes, says "ready", and on a line from
/// stdin writes again: "closed" if the export refuses it.
const HOLD_NBD: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x5a" * 4096, 8192)
h.flush()
print("ready", flush=True)
sys.stdin.readline()
try:
    h.pwrite(b"\x00" * 4096, 8192)
    h.flush()
    print("still open", flush=True)
except nbd.Error as e:
    print("closed", e.errno, flush=True)
"#;

#[test]
fn cinderclient_attach_flow_makes_the_compute_attachment_and_serves_its_export() {
    use std::io::{BufRead, Write};

    let c = daemon();
    let (token, project) = admin_token(&c, PW);
    let api = Api::new(&c, &token, &project, "/volume/v3");
    let made = api.call(
        "POST",
        "/volumes",
        Some(&json!({"volume": {"size": 1, "name": "legacy"}})),
    );
    assert_eq!(made.status, 202, "{}", made.body);
    let vid = made.json()["volume"]["id"].as_str().unwrap().to_owned();
    let sid = server(&c, &token, &project);
    let other_server = server(&c, &token, &project);
    let status = || {
        api.get(&format!("/volumes/{vid}")).json()["volume"]["status"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let action = |body: Value| api.call("POST", &format!("/volumes/{vid}/action"), Some(&body));
    let compute_attachments = |server: &str| {
        c.request(
            "GET",
            &format!("/compute/v2.1/{project}/servers/{server}/os-volume_attachments"),
            &[("X-Auth-Token", &token)],
            None,
        )
        .json()["volumeAttachments"]
            .clone()
    };
    let flow = |args: &[&str]| -> Value {
        let o = run(common::clean(common::venv_bin("python"))
            .env("OS_CLIENT_CONFIG_FILE", c.data_dir().join("clouds.yaml"))
            .arg("-c")
            .arg(CINDERCLIENT_ATTACH_FLOW)
            .args(args));
        assert!(
            o.ok,
            "cinderclient failed:\n{}\n{}\n--- daemon log ---\n{}",
            o.stdout,
            o.stderr,
            c.logs.text()
        );
        serde_json::from_str(o.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", o.stdout))
    };

    // Refused while available, each changing nothing.
    assert_eq!(
        fault(
            &action(json!({"os-begin_detaching": {}})),
            400,
            "badRequest"
        ),
        "Invalid volume: Unable to detach volume. Volume status must be 'in-use' and attach_status must be 'attached' to detach."
    );
    let attach_to = |instance: &str| json!({"os-attach": {"instance_uuid": instance, "mountpoint": "/dev/vdc", "mode": "rw"}});
    assert_eq!(
        fault(&action(attach_to(NO_SUCH)), 404, "itemNotFound"),
        format!("Instance {NO_SUCH} could not be found.")
    );
    let m = fault(
        &action(json!({"os-attach": {"host_name": "hv1", "mountpoint": "/dev/vdc"}})),
        400,
        "badRequest",
    );
    assert!(m.contains("instance_uuid is required"), "{m}");
    for bad in [
        json!({"os-attach": {"instance_uuid": sid, "mountpoint": "/dev/vdc", "mode": "rx"}}),
        json!({"os-attach": {"instance_uuid": sid}}),
        json!({"os-attach": {"instance_uuid": "nope", "mountpoint": "/dev/vdc"}}),
        json!({"os-attach": {"instance_uuid": sid, "mountpoint": "/dev/vdc", "x": 1}}),
        json!({"os-detach": {"attachment_id": "nope"}}),
        json!({"os-initialize_connection": {}}),
        json!({"os-initialize_connection": {"connector": 7}}),
        json!({"os-terminate_connection": {}}),
    ] {
        fault(&action(bad), 400, "badRequest");
    }
    assert_eq!(
        fault(
            &api.call(
                "POST",
                &format!("/volumes/{NO_SUCH}/action"),
                Some(&json!({"os-reserve": null}))
            ),
            404,
            "itemNotFound"
        ),
        format!("Volume {NO_SUCH} could not be found.")
    );
    // Unreserve and roll back are cinder's conditional updates: nothing to do, 202.
    assert_eq!(action(json!({"os-unreserve": null})).status, 202);
    assert_eq!(action(json!({"os-roll_detaching": {}})).status, 202);
    assert_eq!(status(), "available");
    assert_eq!(compute_attachments(&sid), json!([]));
    // The v2 mount takes the actions too.
    let v2 = |body: Value| {
        c.request(
            "POST",
            &format!("/v2/{project}/volumes/{vid}/action"),
            &[("X-Auth-Token", &token)],
            Some(("application/json", &body.to_string())),
        )
        .status
    };
    assert_eq!(v2(json!({"os-reserve": {}})), 202);
    assert_eq!(status(), "attaching");
    assert_eq!(v2(json!({"os-unreserve": {}})), 202);
    assert_eq!(status(), "available");

    // cinderclient attaches: the statuses cinder's flow goes through, the connection info.
    let out = flow(&["attach", &vid, &sid]);
    assert_eq!(
        out["status"],
        json!([
            ["reserve", "attaching"],
            ["unreserve", "available"],
            ["reserve", "attaching"],
            ["attach", "in-use"]
        ])
    );
    let info = &out["connection_info"];
    assert_eq!(info["driver_volume_type"], "nbd", "{info}");
    let data = &info["data"];
    let uri = data["uri"].as_str().expect("uri").to_owned();
    assert_eq!(
        uri,
        format!(
            "nbd://{}:{}/{vid}",
            data["host"].as_str().unwrap(),
            data["port"]
        ),
        "{info}"
    );
    assert_eq!(
        (data["export_name"].as_str(), data["access_mode"].as_str()),
        (Some(vid.as_str()), Some("rw")),
        "{info}"
    );
    let attachments = out["attachments"].as_array().expect("attachments");
    assert_eq!(attachments.len(), 1, "{attachments:?}");
    assert_eq!(
        (
            attachments[0]["server_id"].as_str(),
            attachments[0]["device"].as_str()
        ),
        (Some(sid.as_str()), Some("/dev/vdc"))
    );
    let attachment = attachments[0]["attachment_id"]
        .as_str()
        .expect("attachment id")
        .to_owned();

    // Compute sees the same attachment, with the same export; the URI serves the volume.
    assert_eq!(
        compute_attachments(&sid),
        json!([{"id": vid, "serverId": sid, "volumeId": vid, "device": "/dev/vdc", "nbdUri": uri}])
    );
    qemu_io(&uri, "write -P 0x5a 0 1M");
    qemu_io(&uri, "read -P 0x5a 0 1M");
    let size = run(std::process::Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(
        size.stdout.trim(),
        (1u64 << 30).to_string(),
        "{}",
        size.stderr
    );

    // Refused while attached, changing nothing.
    assert_eq!(
        fault(&action(json!({"os-reserve": {}})), 400, "badRequest"),
        "Invalid volume: Volume status must be available to reserve, but the status is in-use."
    );
    assert_eq!(
        fault(&action(attach_to(&other_server)), 400, "badRequest"),
        "Error attaching volume - InvalidVolume: Invalid volume: volume is already attached and multiple attachments are not enabled"
    );
    let m = fault(
        &action(json!({"os-detach": {"attachment_id": NO_SUCH}})),
        400,
        "badRequest",
    );
    assert!(m.contains("VolumeAttachmentNotFound"), "{m}");
    assert_eq!(status(), "in-use");
    assert_eq!(compute_attachments(&other_server), json!([]));

    // A client connected across the detach.
    let mut held = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(HOLD_NBD)
        .arg(&uri)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (libnbd)");
    let mut held_in = held.stdin.take().expect("stdin");
    let mut held_out = std::io::BufReader::new(held.stdout.take().expect("stdout")).lines();
    let mut held_line = || held_out.next().expect("a line").expect("line");
    assert_eq!(held_line(), "ready");

    // cinderclient detaches: the detach ends the attachment as Compute's does, fence
    // included: once it has answered, the held connection's write is refused.
    let out = flow(&["detach", &vid, &attachment]);
    assert_eq!(
        out["status"],
        json!([
            ["begin_detaching", "detaching"],
            ["roll_detaching", "in-use"],
            ["begin_detaching", "detaching"],
            ["terminate_connection", "detaching"],
            ["detach", "available"]
        ])
    );
    held_in.write_all(b"go\n").expect("write");
    let closed = held_line();
    assert!(closed.starts_with("closed"), "{closed}");
    assert!(held.wait().expect("wait").success());
    assert_eq!(compute_attachments(&sid), json!([]));
    assert_eq!(
        api.get(&format!("/volumes/{vid}")).json()["volume"]["attachments"],
        json!([])
    );
    let gone = run(std::process::Command::new("nbdinfo").args(["--size", &uri]));
    assert!(!gone.ok, "the export outlived the detach: {}", gone.stdout);

    // Read-only: a flagged volume takes only `ro`; an `ro` attachment alone makes the export
    // read-only, and what the refused write of the held connection would have changed is
    // still there.
    assert_eq!(
        action(json!({"os-update_readonly_flag": {"readonly": true}})).status,
        202
    );
    assert_eq!(
        fault(&action(attach_to(&sid)), 400, "badRequest"),
        format!("Invalid attaching mode 'rw' for volume {vid}.")
    );
    assert_eq!(status(), "available");
    assert_eq!(
        action(json!({"os-update_readonly_flag": {"readonly": false}})).status,
        202
    );
    let ro = json!({"os-attach": {"instance_uuid": sid, "mountpoint": "/dev/vdd", "mode": "ro"}});
    assert_eq!(action(ro).status, 202);
    assert_eq!(status(), "in-use");
    assert_eq!(compute_attachments(&sid)[0]["device"], "/dev/vdd");
    let info = action(json!({"os-initialize_connection": {"connector": {"host": "hv1"}}}));
    assert_eq!(info.status, 200, "{}", info.body);
    assert_eq!(info.json()["connection_info"]["data"]["access_mode"], "ro");
    write_refused(&uri, "an ro attachment's export took a write");
    read_matches(&uri, "read -P 0x5a 0 1M");
    // `os-detach` without an id ends the only attachment.
    assert_eq!(action(json!({"os-detach": null})).status, 202);
    assert_eq!(status(), "available");
    assert_eq!(compute_attachments(&sid), json!([]));
}

/// A caller of `/volume/v3/{project}` at microversion `version` (`None`: no header, 3.0).
fn at<'a>(
    c: &'a Cairn,
    token: &str,
    project: &str,
    version: Option<&str>,
) -> impl Fn(&str, &str, Option<&Value>) -> Reply + use<'a> {
    let (c, token, project) = (c, token.to_owned(), project.to_owned());
    let header = version.map(|v| format!("volume {v}"));
    move |method: &str, rest: &str, body: Option<&Value>| {
        let mut headers = vec![("X-Auth-Token", token.as_str())];
        if let Some(h) = &header {
            headers.push(("OpenStack-API-Version", h.as_str()));
        }
        let body = body.map(Value::to_string);
        c.request(
            method,
            &format!("/volume/v3/{project}{rest}"),
            &headers,
            body.as_deref().map(|b| ("application/json", b)),
        )
    }
}

/// Waits until a volume is no longer `uploading` (its upload job ended, either way); returns
/// the volume.
fn wait_not_uploading(c: &Cairn, token: &str, project: &str, volume: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let v = c
            .request(
                "GET",
                &format!("/volume/v3/{project}/volumes/{volume}"),
                &[("X-Auth-Token", token)],
                None,
            )
            .json();
        if v["volume"]["status"] != "uploading" {
            return v["volume"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still uploading: {v}\n{}",
            c.logs.text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Microversions 3.1 to 3.3 with cinderclient and HTTP: upload-to-image with visibility and
/// protected (3.1), the strict bootable filter (3.2), and user messages (3.3), the one an
/// upload that fails leaves (the image service refuses an image larger than its cap: a real
/// failure, in the job after the 202): the volume comes back, the image is gone, and the
/// message is there, for the project that asked, after a restart too.
#[test]
fn microversions_to_3_3_and_failed_uploads_as_user_messages() {
    let data = common::temp_dir();
    let serve = || {
        Serve::new()
            .data_dir(data.path())
            .arg("--admin-password")
            .arg(PW)
            // 1 GiB volumes upload; a 2 GiB one is over the cap.
            .arg("--image-size-cap")
            .arg("1073741824")
            .start()
    };
    let mut c = serve();
    let (token, project) = admin_token(&c, PW);
    let v30 = at(&c, &token, &project, None);
    let v31 = at(&c, &token, &project, Some("3.1"));
    let v32 = at(&c, &token, &project, Some("3.2"));
    let v33 = at(&c, &token, &project, Some("3.3"));
    let cinder_at = |version: &str, args: &[&str]| {
        run(os_client(&c, "cinder", PW)
            .args(["--os-volume-api-version", version])
            .args(args))
    };

    // Discovery and negotiation: 3.0 to 3.3; 3.4 is refused, as cinder refuses what it
    // does not speak.
    let doc = c.get("/volume/v3").json();
    assert_eq!(
        (
            doc["versions"][0]["version"].as_str(),
            doc["versions"][0]["min_version"].as_str()
        ),
        (Some("3.3"), Some("3.0")),
        "{doc}"
    );
    let r = v33("GET", "/volumes", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("openstack-api-version"), Some("volume 3.3"));
    let latest = at(&c, &token, &project, Some("latest"))("GET", "/volumes", None);
    assert_eq!(latest.header("openstack-api-version"), Some("volume 3.3"));
    assert_eq!(
        fault(
            &at(&c, &token, &project, Some("3.4"))("GET", "/messages", None),
            406,
            "computeFault"
        ),
        "Version 3.4 is not supported by the API. Minimum is 3.0 and maximum is 3.3."
    );

    // 3.1: the CLI's upload-to-image with --visibility and --protected; the image has both.
    let made = osc(
        &c,
        &["volume", "create", "--size", "1", "-f", "json", "small"],
    )
    .json();
    let small = made["id"].as_str().unwrap().to_owned();
    let up = cinder_at(
        "3.1",
        &[
            "upload-to-image",
            "--visibility",
            "community",
            "--protected",
            "True",
            &small,
            "img31",
        ],
    );
    assert!(up.ok, "{}{}", up.stdout, up.stderr);
    let row = |out: &str, key: &str| {
        out.lines()
            .find(|l| l.split('|').nth(1).is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split('|').nth(2))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| panic!("no {key} in\n{out}"))
    };
    assert_eq!(row(&up.stdout, "visibility"), "community");
    assert_eq!(row(&up.stdout, "protected"), "True");
    let image = row(&up.stdout, "image_id");
    let i = wait_upload(&c, &token, &project, &small, &image);
    assert_eq!(
        (i["visibility"].as_str(), i["protected"].as_bool()),
        (Some("community"), Some(true)),
        "{i}"
    );
    // Below 3.1 the fields are unknown; from 3.1 on they are checked; public needs admin.
    let upload = |call: &dyn Fn(&str, &str, Option<&Value>) -> Reply, args: Value| {
        call(
            "POST",
            &format!("/volumes/{small}/action"),
            Some(&json!({ "os-volume_upload_image": args })),
        )
    };
    let images = || {
        c.request("GET", "/v2/images", &[("X-Auth-Token", &token)], None)
            .json()["images"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = images();
    assert_eq!(
        fault(
            &upload(&v30, json!({"image_name": "x", "visibility": "private"})),
            400,
            "badRequest"
        ),
        "Invalid input for field/attribute os-volume_upload_image. Value: Additional properties are not allowed ('visibility' was unexpected)"
    );
    assert_eq!(
        fault(
            &upload(&v31, json!({"image_name": "x", "visibility": "everyone"})),
            400,
            "badRequest"
        ),
        "Invalid input for field/attribute visibility. Value: everyone. 'everyone' is not one of ['community', 'public', 'private', 'shared']"
    );
    let m = fault(
        &upload(&v31, json!({"image_name": "x", "protected": "maybe"})),
        400,
        "badRequest",
    );
    assert!(m.starts_with("Invalid input for field/attribute protected. Value: maybe. 'maybe' is not one of [True, 'True',"), "{m}");
    let (mtoken, mproject) = common::project_user(&c, &token, "uploader", "member");
    let member = at(&c, &mtoken, &mproject, Some("3.1"));
    let r = member(
        "POST",
        "/volumes",
        Some(&json!({"volume": {"size": 1, "name": "theirs"}})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let theirs = r.json()["volume"]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        fault(
            &member(
                "POST",
                &format!("/volumes/{theirs}/action"),
                Some(
                    &json!({"os-volume_upload_image": {"image_name": "x", "visibility": "public"}})
                )
            ),
            403,
            "forbidden"
        ),
        "Policy doesn't allow volume_extension:volume_actions:upload_public to be performed."
    );
    // Refused requests changed nothing.
    assert_eq!(images(), before);
    for (vid, call) in [(&small, &v30), (&theirs, &member)] {
        let v = call("GET", &format!("/volumes/{vid}"), None).json();
        assert_eq!(v["volume"]["status"], "available", "{v}");
    }

    // 3.2: `bootable` takes only boolean words; before, anything but false meant true.
    let r = v30(
        "POST",
        &format!("/volumes/{small}/action"),
        Some(&json!({"os-set_bootable": {"bootable": true}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let big = v30(
        "POST",
        "/volumes",
        Some(&json!({"volume": {"size": 2, "name": "big"}})),
    );
    assert_eq!(big.status, 202, "{}", big.body);
    let big = big.json()["volume"]["id"].as_str().unwrap().to_owned();
    let names = |r: Reply| -> Vec<String> {
        assert_eq!(r.status, 200, "{}", r.body);
        let mut n: Vec<String> = r.json()["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names(v30("GET", "/volumes?bootable=maybe", None)),
        ["small"]
    );
    assert_eq!(names(v30("GET", "/volumes?bootable=0", None)), ["small"]);
    assert_eq!(names(v30("GET", "/volumes?bootable=false", None)), ["big"]);
    assert_eq!(
        names(v32("GET", "/volumes/detail?bootable=0", None)),
        ["big"]
    );
    assert_eq!(names(v32("GET", "/volumes?bootable=T", None)), ["small"]);
    assert_eq!(
        fault(
            &v32("GET", "/volumes?bootable=maybe", None),
            400,
            "badRequest"
        ),
        "Invalid input received: 'bootable = maybe'"
    );

    // 3.3: no message yet, and none below 3.3 (the method is absent there).
    assert_eq!(
        v33("GET", "/messages", None).json(),
        json!({"messages": []})
    );
    for call in [&v30, &v32] {
        assert_eq!(
            fault(&call("GET", "/messages", None), 404, "itemNotFound"),
            "The resource could not be found."
        );
        fault(
            &call("GET", &format!("/messages/{NO_SUCH}"), None),
            404,
            "itemNotFound",
        );
        fault(
            &call("DELETE", &format!("/messages/{NO_SUCH}"), None),
            404,
            "itemNotFound",
        );
    }

    // An upload the image service refuses: 202, then the job fails.
    let r = v33(
        "POST",
        &format!("/volumes/{big}/action"),
        Some(&json!({"os-volume_upload_image": {"image_name": "toobig"}})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let request_id = r.header("x-openstack-request-id").unwrap().to_owned();
    let failed_image = r.json()["os-volume_upload_image"]["image_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = wait_not_uploading(&c, &token, &project, &big);
    assert_eq!(v["status"], "available", "the volume is back: {v}");
    let gone = c.request(
        "GET",
        &format!("/v2/images/{failed_image}"),
        &[("X-Auth-Token", &token)],
        None,
    );
    assert_eq!(
        gone.status, 404,
        "the failed upload's image is deleted: {}",
        gone.body
    );

    // The operator reads it with cinderclient...
    let list = cinder_at("3.3", &["message-list"]);
    assert!(list.ok, "{}{}", list.stdout, list.stderr);
    let lines: Vec<&str> = list.stdout.lines().filter(|l| l.contains(&big)).collect();
    assert_eq!(lines.len(), 1, "{}", list.stdout);
    assert!(
        lines[0].contains("VOLUME_VOLUME_003_004")
            && lines[0]
                .contains("copy volume to image:Failed to upload volume to image at backend.")
            && lines[0].contains("| VOLUME "),
        "{}",
        list.stdout
    );
    let id = lines[0].split('|').nth(1).unwrap().trim().to_owned();
    let show = cinder_at("3.3", &["message-show", &id]);
    assert!(show.ok, "{}{}", show.stdout, show.stderr);
    assert_eq!(row(&show.stdout, "request_id"), request_id);
    assert_eq!(row(&show.stdout, "message_level"), "ERROR");
    assert_eq!(row(&show.stdout, "resource_uuid"), big);

    // ... and it is cinder's view over HTTP, kept 30 days (message_ttl).
    let m = v33("GET", &format!("/messages/{id}"), None);
    assert_eq!(m.status, 200, "{}", m.body);
    let m = m.json()["message"].clone();
    assert_eq!(
        (
            m["event_id"].as_str(),
            m["user_message"].as_str(),
            m["message_level"].as_str(),
            m["resource_type"].as_str(),
            m["resource_uuid"].as_str(),
            m["request_id"].as_str()
        ),
        (
            Some("VOLUME_VOLUME_003_004"),
            Some("copy volume to image:Failed to upload volume to image at backend."),
            Some("ERROR"),
            Some("VOLUME"),
            Some(big.as_str()),
            Some(request_id.as_str())
        ),
        "{m}"
    );
    let when = |k: &str| {
        let s = format!("{}Z", m[k].as_str().unwrap());
        time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("{k} {s}: {e}"))
    };
    assert_eq!(
        when("guaranteed_until") - when("created_at"),
        time::Duration::days(30)
    );
    let links = m["links"].to_string();
    assert!(
        links.contains(&format!("/volume/v3/{project}/messages/{id}"))
            && links.contains(&format!("/volume/{project}/messages/{id}")),
        "{links}"
    );
    assert_eq!(
        v33("GET", "/messages", None).json()["messages"][0]["id"],
        id.as_str()
    );

    // Another project does not see it, and cannot delete it.
    let other = at(&c, &mtoken, &mproject, Some("3.3"));
    assert_eq!(
        other("GET", "/messages", None).json(),
        json!({"messages": []})
    );
    assert_eq!(
        fault(
            &other("GET", &format!("/messages/{id}"), None),
            404,
            "itemNotFound"
        ),
        format!("Message {id} could not be found.")
    );
    fault(
        &other("DELETE", &format!("/messages/{id}"), None),
        404,
        "itemNotFound",
    );
    // Unknown ids.
    assert_eq!(
        fault(
            &v33("GET", &format!("/messages/{NO_SUCH}"), None),
            404,
            "itemNotFound"
        ),
        format!("Message {NO_SUCH} could not be found.")
    );
    fault(&v33("DELETE", "/messages/nope", None), 404, "itemNotFound");

    // It survives a restart.
    drop((v30, v31, v32, v33, other, member));
    c.stop_with(libc::SIGTERM);
    let c = serve();
    let (token, _) = admin_token(&c, PW);
    let v33 = at(&c, &token, &project, Some("3.3"));
    // The same message (its links name the new daemon's address).
    let without_links = |mut m: Value| {
        m.as_object_mut().unwrap().remove("links");
        m
    };
    assert_eq!(
        without_links(v33("GET", &format!("/messages/{id}"), None).json()["message"].clone()),
        without_links(m)
    );

    // message-delete: 204 over HTTP (cinderclient says nothing), then it is gone.
    let cinder_at = |version: &str, args: &[&str]| {
        run(os_client(&c, "cinder", PW)
            .args(["--os-volume-api-version", version])
            .args(args))
    };
    let del = cinder_at("3.3", &["message-delete", &id]);
    assert!(del.ok, "{}{}", del.stdout, del.stderr);
    fault(
        &v33("GET", &format!("/messages/{id}"), None),
        404,
        "itemNotFound",
    );
    assert_eq!(
        v33("GET", "/messages", None).json(),
        json!({"messages": []})
    );
    let again = cinder_at("3.3", &["message-delete", &id]);
    assert!(!again.ok, "{}", again.stdout);
}
