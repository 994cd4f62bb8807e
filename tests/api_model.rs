//! One volume, many views: the real daemon driven over HTTP through several API families at
//! once (pdisk, Compute, Keystone), concurrency on one volume, state across a restart, and the
//! `cairn` CLI as a client.

mod common;

use std::{sync::Arc, thread};

use common::{Cairn, Reply, Serve, run_cairn, temp_dir};
use serde_json::{Value, json};

const PW: &str = "model-test-admin-pw";

fn daemon() -> Cairn {
    Serve::new().arg("--admin-password").arg(PW).start()
}

/// A project-scoped admin token and the project id.
fn admin_token(c: &Cairn) -> (String, String) {
    common::admin_token(c, PW)
}

struct Api<'a> {
    c: &'a Cairn,
    token: String,
    project: String,
}

impl Api<'_> {
    fn compute(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let b = body.map(|v| v.to_string());
        self.c.request(
            method,
            &format!("/v1.1/{}{path}", self.project),
            &[("x-auth-token", &self.token)],
            b.as_deref().map(|b| ("application/json", b)),
        )
    }
    /// pdisk with HTTP Basic, as the original clients did.
    fn pdisk(&self, method: &str, path: &str, form: Option<&str>) -> Reply {
        let basic = format!("Basic {}", b64(&format!("admin:{PW}")));
        self.c.request(
            method,
            &format!("/api{path}"),
            &[("authorization", &basic)],
            form.map(|f| ("application/x-www-form-urlencoded", f)),
        )
    }
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn ok(r: &Reply, codes: &[u16]) -> Value {
    assert!(
        codes.contains(&r.status),
        "status {} not in {codes:?}: {}",
        r.status,
        r.body
    );
    if r.body.trim().is_empty() {
        Value::Null
    } else {
        r.json()
    }
}

#[test]
fn one_volume_seen_and_changed_through_every_family() {
    let c = daemon();
    let (token, project) = admin_token(&c);
    let api = Api {
        c: &c,
        token,
        project,
    };

    // Created through pdisk...
    let r = api.pdisk(
        "POST",
        "/create",
        Some("size=1&tag=shared&visibility=private"),
    );
    let uuid = ok(&r, &[201])["uuid"].as_str().expect("uuid").to_owned();

    // ...seen through Compute.
    let v = ok(
        &api.compute("GET", &format!("/os-volumes/{uuid}"), None),
        &[200],
    );
    assert_eq!(v["volume"]["status"], "available");
    assert_eq!(v["volume"]["size"], 1);
    assert_eq!(v["volume"]["attachments"], json!([{}]));

    // Attached through Compute...
    let s = ok(
        &api.compute("POST", "/servers", Some(json!({"server": {"name": "vm1"}}))),
        &[200, 202],
    );
    let server = s["server"]["id"].as_str().expect("server id").to_owned();
    let a = ok(
        &api.compute(
            "POST",
            &format!("/servers/{server}/os-volume_attachments"),
            Some(json!({"volumeAttachment": {"volumeId": uuid}})),
        ),
        &[200, 202],
    );
    assert_eq!(a["volumeAttachment"]["volumeId"], uuid.as_str());
    assert_eq!(a["volumeAttachment"]["serverId"], server.as_str());
    assert_eq!(a["volumeAttachment"]["device"], "/dev/vdb");
    let nbd = a["volumeAttachment"]["nbdUri"].as_str().expect("nbdUri");
    assert!(
        nbd.starts_with("nbd://127.0.0.1:") && nbd.ends_with(&uuid),
        "{nbd}"
    );

    // ...shows as a user and in the headers through pdisk.
    let r = api.pdisk("GET", &format!("/disks/{uuid}"), None);
    let d = ok(&r, &[200]);
    assert_eq!(d["users"], "1");
    assert_eq!(r.header("x-diskuser-limit"), Some("1"));
    assert_eq!(r.header("x-diskuser-remaining"), Some("0"));
    let v = ok(
        &api.compute("GET", &format!("/os-volumes/{uuid}"), None),
        &[200],
    );
    assert_eq!(v["volume"]["status"], "in-use");
    assert_eq!(v["volume"]["attachments"][0]["serverId"], server.as_str());

    // No user slot left: pdisk refuses, and changes nothing; pdisk cannot delete it either.
    let r = api.pdisk(
        "POST",
        &format!("/hotattach/{uuid}"),
        Some("node=n1&vm_id=7"),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["message"].is_array(), "{}", r.body);
    let r = api.pdisk("DELETE", &format!("/disks/{uuid}"), None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        ok(&api.pdisk("GET", &format!("/disks/{uuid}"), None), &[200])["users"],
        "1"
    );

    // Detached through Compute: the slot comes back in pdisk.
    ok(
        &api.compute(
            "DELETE",
            &format!("/servers/{server}/os-volume_attachments/{uuid}"),
            None,
        ),
        &[202],
    );
    let r = api.pdisk("GET", &format!("/disks/{uuid}"), None);
    assert_eq!(ok(&r, &[200])["users"], "0");
    assert_eq!(r.header("x-diskuser-remaining"), Some("1"));

    // Hot-attached through pdisk: the VM appears as a Compute server with the attachment.
    let h = ok(
        &api.pdisk(
            "POST",
            &format!("/hotattach/{uuid}"),
            Some("node=n1&vm_id=7"),
        ),
        &[200],
    );
    assert_eq!(h["target"], "vda");
    let servers = ok(&api.compute("GET", "/servers", None), &[200]);
    let vm = servers["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .find(|s| s["name"] == "n1/7")
        .unwrap_or_else(|| panic!("pdisk VM not listed: {servers}"))["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let l = ok(
        &api.compute("GET", &format!("/servers/{vm}/os-volume_attachments"), None),
        &[200],
    );
    assert_eq!(l["volumeAttachments"][0]["volumeId"], uuid.as_str());
    assert_eq!(l["volumeAttachments"][0]["device"], "vda");
    // pdisk's `vda` and Compute's `/dev/vda` are the same device on that server.
    let other = ok(
        &api.compute("POST", "/os-volumes", Some(json!({"volume": {"size": 1}}))),
        &[200],
    )["volume"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let r = api.compute(
        "POST",
        &format!("/servers/{vm}/os-volume_attachments"),
        Some(json!({"volumeAttachment": {"volumeId": other, "device": "/dev/vda"}})),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    ok(
        &api.compute("DELETE", &format!("/os-volumes/{other}"), None),
        &[202],
    );

    // Deleting that server through Compute detaches the disk for pdisk.
    ok(
        &api.compute("DELETE", &format!("/servers/{vm}"), None),
        &[202, 204],
    );
    assert_eq!(
        ok(&api.pdisk("GET", &format!("/disks/{uuid}"), None), &[200])["users"],
        "0"
    );

    // Deleted through pdisk: gone for Compute, in its fault format.
    ok(
        &api.pdisk("DELETE", &format!("/disks/{uuid}"), None),
        &[200],
    );
    let r = api.compute("GET", &format!("/os-volumes/{uuid}"), None);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["itemNotFound"]["code"], 404, "{}", r.body);
}

#[test]
fn racing_attaches_over_http_admit_exactly_one() {
    let c = daemon();
    let (token, project) = admin_token(&c);
    let api = Api {
        c: &c,
        token,
        project,
    };
    let v = ok(
        &api.compute("POST", "/os-volumes", Some(json!({"volume": {"size": 1}}))),
        &[200, 202],
    );
    let vol = v["volume"]["id"].as_str().expect("id").to_owned();
    let servers: Vec<String> = (0..8)
        .map(|i| {
            let s = ok(
                &api.compute(
                    "POST",
                    "/servers",
                    Some(json!({"server": {"name": format!("s{i}")}})),
                ),
                &[200, 202],
            );
            s["server"]["id"].as_str().expect("id").to_owned()
        })
        .collect();
    let url = Arc::new(c.url(""));
    let statuses: Vec<u16> = thread::scope(|sc| {
        let handles: Vec<_> = servers
            .iter()
            .map(|s| {
                let (url, token, project, vol) = (url.clone(), &api.token, &api.project, &vol);
                sc.spawn(move || {
                    let body = json!({"volumeAttachment": {"volumeId": vol}}).to_string();
                    common::http_request(
                        "POST",
                        &format!("{url}/v1.1/{project}/servers/{s}/os-volume_attachments"),
                        &[("x-auth-token", token)],
                        Some(("application/json", &body)),
                    )
                    .expect("transport")
                    .status
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let won = statuses.iter().filter(|s| **s == 200 || **s == 202).count();
    let refused = statuses.iter().filter(|s| **s == 409).count();
    assert_eq!((won, refused), (1, 7), "{statuses:?}");
    let v = ok(
        &api.compute("GET", &format!("/os-volumes/{vol}"), None),
        &[200],
    );
    assert_eq!(v["volume"]["attachments"].as_array().map(Vec::len), Some(1));
}

#[test]
fn state_survives_a_restart() {
    let tmp = temp_dir();
    let data = tmp.path().join("data");
    let mut c = Serve::new()
        .data_dir(&data)
        .arg("--admin-password")
        .arg(PW)
        .start();
    let (token, project) = admin_token(&c);
    let api = Api {
        c: &c,
        token: token.clone(),
        project: project.clone(),
    };
    let v = ok(
        &api.compute(
            "POST",
            "/os-volumes",
            Some(json!({"volume": {"size": 3, "display_name": "keep"}})),
        ),
        &[200, 202],
    );
    let vol = v["volume"]["id"].as_str().expect("id").to_owned();
    let s = ok(
        &api.compute("POST", "/servers", Some(json!({"server": {"name": "vm"}}))),
        &[200, 202],
    );
    let server = s["server"]["id"].as_str().expect("id").to_owned();
    ok(
        &api.compute(
            "POST",
            &format!("/servers/{server}/os-volume_attachments"),
            Some(json!({"volumeAttachment": {"volumeId": vol, "device": "/dev/vdc"}})),
        ),
        &[200, 202],
    );
    drop(api);
    assert!(c.stop_with(libc::SIGTERM).success());

    // The same token, volume, server and attachment after a restart.
    let c = Serve::new().data_dir(&data).start();
    let api = Api {
        c: &c,
        token,
        project,
    };
    let v = ok(
        &api.compute("GET", &format!("/os-volumes/{vol}"), None),
        &[200],
    );
    assert_eq!(v["volume"]["displayName"], "keep");
    assert_eq!(v["volume"]["size"], 3);
    assert_eq!(v["volume"]["status"], "in-use");
    assert_eq!(v["volume"]["attachments"][0]["device"], "/dev/vdc");
    assert_eq!(v["volume"]["attachments"][0]["serverId"], server.as_str());
    drop(tmp);
}

/// `cairn volume|server|project|user` against the running daemon, with the credentials the
/// daemon wrote to `<data-dir>/clouds.yaml`.
#[test]
fn cli_is_a_client_of_the_daemon() {
    let c = daemon();
    let data = c.data_dir().to_str().expect("utf8 path").to_owned();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--data-dir", &data]);
        let (status, out, err) = run_cairn(&all);
        assert!(status.success(), "cairn {args:?} failed: {err}\n{out}");
        out
    };

    // The benchmarker's one-liner: a fresh attached volume's NBD URI on stdout, alone.
    let uri = cli(&["volume", "create", "--size", "10G", "--attach", "bench"]);
    let uri = uri.trim();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    let vol = uri.rsplit('/').next().expect("volume id").to_owned();
    assert!(uuid::Uuid::parse_str(&vol).is_ok(), "{uri}");

    let list: Value = serde_json::from_str(&cli(&["volume", "list", "--json"])).expect("json");
    let mine = list
        .as_array()
        .expect("array")
        .iter()
        .find(|v| v["id"] == vol.as_str())
        .expect("created volume listed");
    assert_eq!(mine["size"], 10);
    assert_eq!(mine["status"], "in-use");
    let table = cli(&["volume", "show", &vol]);
    assert!(table.contains(&vol) && table.contains("in-use"), "{table}");
    let servers = cli(&["server", "list"]);
    assert!(servers.contains("bench"), "{servers}");

    // In use: delete is refused with the API's message, and nothing changes.
    let (status, _, err) = run_cairn(&["volume", "delete", &vol, "--data-dir", &data]);
    assert!(!status.success());
    assert!(err.contains("409") || err.contains("400"), "{err}");
    // Detach without --server: from its one server. Not attached: a clear error.
    cli(&["volume", "detach", &vol]);
    let (status, _, err) = run_cairn(&["volume", "detach", &vol, "--data-dir", &data]);
    assert!(!status.success());
    assert!(err.contains("not attached"), "{err}");
    cli(&["volume", "delete", &vol]);
    // Attached to two servers: refused, naming both.
    let shared = cli(&[
        "volume",
        "create",
        "--size",
        "1G",
        "--multiattach",
        "--json",
    ]);
    let shared: Value = serde_json::from_str(&shared).expect("json");
    let shared = shared["id"].as_str().expect("id").to_owned();
    cli(&["server", "create", "vm-a"]);
    cli(&["server", "create", "vm-b"]);
    cli(&["volume", "attach", &shared, "--server", "vm-a"]);
    cli(&["volume", "attach", &shared, "--server", "vm-b"]);
    let (status, _, err) = run_cairn(&["volume", "detach", &shared, "--data-dir", &data]);
    assert!(!status.success());
    assert!(
        err.contains("2 servers") && err.contains("--server"),
        "{err}"
    );
    cli(&["volume", "detach", &shared, "--server", "vm-a"]);
    cli(&["volume", "detach", &shared]);
    let list: Value = serde_json::from_str(&cli(&["volume", "list", "--json"])).expect("json");
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .all(|v| v["id"] != vol.as_str())
    );

    // Identity through the CLI: the new user can log in to the new project.
    cli(&["project", "create", "team"]);
    cli(&[
        "user",
        "create",
        "dev",
        "--password",
        "dev-pw",
        "--project",
        "team",
    ]);
    assert!(cli(&["project", "list"]).contains("team"));
    assert!(cli(&["user", "list"]).contains("dev"));
    let body = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": "dev", "domain": {"name": "Default"}, "password": "dev-pw"}}},
        "scope": {"project": {"name": "team", "domain": {"name": "Default"}}}}});
    let r = c.request(
        "POST",
        "/v3/auth/tokens",
        &[],
        Some(("application/json", &body.to_string())),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let roles: Vec<String> = r.json()["token"]["roles"]
        .as_array()
        .expect("roles")
        .iter()
        .filter_map(|x| x["name"].as_str().map(str::to_owned))
        .collect();
    // Keystone's implied roles: member implies reader.
    assert_eq!(roles, vec!["member".to_owned(), "reader".to_owned()]);

    // Bad input: a clear error, non-zero exit.
    let (status, _, err) = run_cairn(&["volume", "create", "--size", "0G", "--data-dir", &data]);
    assert!(!status.success());
    assert!(err.contains("size"), "{err}");

    // Shared filesystems (seed 002) through `cairn fs`.
    let made = cli(&["fs", "create", "scratch", "--size", "2Gb", "--json"]);
    let made: Value = serde_json::from_str(&made).expect("json");
    assert_eq!(
        made,
        json!({"name": "scratch", "size": "2Gb", "scope": "instance"})
    );
    cli(&[
        "fs", "create", "home", "--size", "4Gb", "--scope", "project",
    ]);
    let table = cli(&["fs", "list"]);
    assert!(
        table.contains("home") && table.contains("scratch"),
        "{table}"
    );
    cli(&["fs", "connect", "scratch", "--server", "vm-a"]);
    let vm_a = cli(&["server", "list", "--json"]);
    let vm_a: Value = serde_json::from_str(&vm_a).expect("json");
    let vm_a = vm_a
        .as_array()
        .expect("servers")
        .iter()
        .find(|v| v["name"] == "vm-a")
        .expect("vm-a")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let seen = cli(&["fs", "instances", "scratch"]);
    assert!(seen.contains(&vm_a), "{seen}");
    cli(&["fs", "disconnect", "scratch", "--server", "vm-a"]);
    assert!(!cli(&["fs", "instances", "scratch"]).contains(&vm_a));
    let (status, _, err) = run_cairn(&["fs", "create", "x", "--size", "4Pb", "--data-dir", &data]);
    assert!(!status.success());
    assert!(err.contains("size"), "{err}");
    cli(&["fs", "delete", "scratch"]);
    let (status, _, err) = run_cairn(&["fs", "show", "scratch", "--data-dir", &data]);
    assert!(!status.success());
    assert!(err.contains("not be found"), "{err}");
}
