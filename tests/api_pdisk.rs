//! The persistent-disk API (seed 001) of the real daemon, driven with the real `curl` binary as
//! the original's clients and node hooks did (`curl -u user:pw -d node=... .../api/...`).
//! Every endpoint, each error path, the user limit, hot-plug targets and visibility across
//! users.

mod common;

use std::process::Command;

use common::{Cairn, Reply, Serve, run_cairn, temp_dir};
use serde_json::{Value, json};

const PW: &str = "pdisk-test-admin-pw";
const ADMIN: &str = "admin:pdisk-test-admin-pw";
const REALM: &str = "Basic realm=\"Stratuslab Persistent Disk Storage\"";

fn daemon() -> Cairn {
    Serve::new().arg("--admin-password").arg(PW).start()
}

/// Runs `curl -sS -i <args> <url>` and parses the reply (status, headers, body).
fn curl(c: &Cairn, args: &[&str], path: &str) -> Reply {
    let url = c.url(path);
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "60", "--noproxy", "*"])
        .args(args)
        .arg(&url)
        .output()
        .expect("run curl (is it installed?)");
    assert!(
        out.status.success(),
        "curl {args:?} {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8 reply");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let content_type = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    Reply {
        status,
        content_type,
        body: body.to_owned(),
        headers,
    }
}

/// `curl -u <user> -X <method> [-d field ...] /api<path>`: form-encoded, as the original.
fn pd(c: &Cairn, user: &str, method: &str, path: &str, form: &[&str]) -> Reply {
    let mut args = vec!["-u", user, "-X", method];
    for f in form {
        args.push("--data-raw");
        args.push(f);
    }
    curl(c, &args, &format!("/api{path}"))
}

/// Same with a JSON body.
fn pd_json(c: &Cairn, user: &str, path: &str, body: &Value) -> Reply {
    let b = body.to_string();
    curl(
        c,
        &[
            "-u",
            user,
            "-H",
            "Content-Type: application/json",
            "--data-raw",
            &b,
        ],
        &format!("/api{path}"),
    )
}

#[track_caller]
fn expect_error(r: &Reply, status: u16, messages: &[&str]) {
    assert_eq!(r.status, status, "{}", r.body);
    assert!(r.content_type.starts_with("application/json"), "{r:?}");
    assert_eq!(r.json(), json!({ "message": messages }), "{}", r.body);
}

#[track_caller]
fn create(c: &Cairn, user: &str, form: &[&str]) -> String {
    let r = pd(c, user, "POST", "/create", form);
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
    v["uuid"].as_str().expect("uuid").to_owned()
}

fn show(c: &Cairn, user: &str, uuid: &str) -> Reply {
    pd(c, user, "GET", &format!("/disks/{uuid}"), &[])
}

/// `(users, X-DiskUser-Limit, X-DiskUser-Remaining)` of a disk.
#[track_caller]
fn usage(c: &Cairn, uuid: &str) -> (String, String, String) {
    let r = show(c, ADMIN, uuid);
    assert_eq!(r.status, 200, "{}", r.body);
    (
        r.json()["users"].as_str().expect("users").to_owned(),
        r.header("x-diskuser-limit").expect("limit").to_owned(),
        r.header("x-diskuser-remaining")
            .expect("remaining")
            .to_owned(),
    )
}

fn u(users: &str, limit: &str, remaining: &str) -> (String, String, String) {
    (users.into(), limit.into(), remaining.into())
}

fn ids(r: &Reply) -> Vec<String> {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["uuid"].as_str().expect("uuid").to_owned())
        .collect()
}

fn is_pdisk_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 19
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'/',
            10 => *c == b' ',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
}

#[test]
fn disks_create_list_show_delete_with_exact_shapes_and_errors() {
    let c = daemon();

    // Authentication: none, a wrong password, a bad token -> 401 with the Basic challenge.
    for args in [
        vec![],
        vec!["-u", "admin:wrong"],
        vec!["-u", "nobody:x"],
        vec!["-H", "X-Auth-Token: not-a-token"],
    ] {
        let r = curl(&c, &args, "/api/disks");
        assert_eq!(r.status, 401, "{args:?}: {}", r.body);
        assert_eq!(r.header("www-authenticate"), Some(REALM), "{args:?}");
        assert_eq!(r.json()["message"].as_array().map(Vec::len), Some(1));
    }
    let r = curl(
        &c,
        &["-d", "size=1", "-d", "tag=t", "-d", "visibility=private"],
        "/api/create",
    );
    assert_eq!(r.status, 401);

    let r = pd(&c, ADMIN, "GET", "/disks", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "[]");

    // Create as the seed's curl line does; the body is exactly {"uuid": ...}.
    let a = create(
        &c,
        ADMIN,
        &["size=2", "tag=a simple disk", "visibility=private"],
    );
    // JSON with a number; names are case-insensitive; multiattach is cairn's extension.
    let r = pd_json(
        &c,
        ADMIN,
        "/create",
        &json!({"Size": 1, "tag": "a public disk", "visibility": "public", "multiattach": "true"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let b = r.json()["uuid"].as_str().expect("uuid").to_owned();

    // Every value a string, in the seed's key order.
    let r = show(&c, ADMIN, &a);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.content_type.starts_with("application/json"));
    let d = r.json();
    let created = d["created"].as_str().expect("created").to_owned();
    assert!(is_pdisk_time(&created), "{created}");
    assert_eq!(
        r.body,
        format!(
            r#"{{"users":"0","created":"{created}","visibility":"private","tag":"a simple disk","owner":"admin","uuid":"{a}","size":"2"}}"#
        )
    );
    assert_eq!(r.header("x-diskuser-limit"), Some("1"));
    assert_eq!(r.header("x-diskuser-remaining"), Some("1"));
    let r = show(&c, ADMIN, &b);
    assert_eq!(r.json()["size"], "1");
    assert_eq!(r.json()["visibility"], "public");
    let limit: u32 = r
        .header("x-diskuser-limit")
        .and_then(|l| l.parse().ok())
        .expect("numeric limit");
    assert!(limit > 1, "multi-attach limit {limit}");
    assert_eq!(
        r.header("x-diskuser-remaining"),
        Some(limit.to_string().as_str())
    );

    let r = pd(&c, ADMIN, "GET", "/disks", &[]);
    assert_eq!(ids(&r), vec![a.clone(), b.clone()]);
    for d in r.json().as_array().expect("array") {
        for (k, v) in d.as_object().expect("object") {
            assert!(v.is_string(), "{k} is not a string: {d}");
        }
    }

    // HEAD answers existence with the headers and no body.
    let r = curl(&c, &["-u", ADMIN, "-I"], &format!("/api/disks/{a}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-diskuser-remaining"), Some("1"));
    assert_eq!(r.body, "");
    let r = curl(
        &c,
        &["-u", ADMIN, "-I"],
        "/api/disks/00000000-0000-4000-8000-000000000000",
    );
    assert_eq!(r.status, 400);

    // A token works as well as Basic.
    let body = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": "admin", "domain": {"name": "Default"}, "password": PW}}},
        "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}})
    .to_string();
    let r = curl(
        &c,
        &["-H", "Content-Type: application/json", "--data-raw", &body],
        "/v3/auth/tokens",
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let token = r.header("x-subject-token").expect("token").to_owned();
    let r = curl(&c, &["-H", &format!("X-Auth-Token: {token}")], "/api/disks");
    assert_eq!(ids(&r), vec![a.clone(), b.clone()]);

    // Create validation: every message at once, 422, nothing created.
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["size=abc", "tag=t", "visibility=secret"],
            &[
                "Invalid disk visibility",
                "Size must be a valid positive integer",
            ],
        ),
        (
            &["size=0", "tag=t", "visibility=private"],
            &["Size must be an integer between 1 and 1024"],
        ),
        (
            &["size=1025", "tag=t", "visibility=public"],
            &["Size must be an integer between 1 and 1024"],
        ),
        (
            &["size=18446744073709551617", "tag=t", "visibility=public"],
            &["Size must be a valid positive integer"],
        ),
        (
            &["tag=t"],
            &["Missing input: visibility", "Missing input: size"],
        ),
        (
            &["size=1", "tag=t", "visibility=private", "multiattach=maybe"],
            &["Invalid multiattach value: use true or false"],
        ),
        (
            &["size=1", "tag=t", "visibility=private", "uuid=x"],
            &["Property uuid is set by the server"],
        ),
    ];
    for (form, messages) in cases {
        let r = pd(&c, ADMIN, "POST", "/create", form);
        expect_error(&r, 422, messages);
    }
    let r = pd_json(
        &c,
        ADMIN,
        "/create",
        &json!({"size": 1.5, "tag": "t", "visibility": "private"}),
    );
    expect_error(&r, 422, &["Size must be a valid positive integer"]);
    let r = curl(
        &c,
        &[
            "-u",
            ADMIN,
            "-H",
            "Content-Type: application/json",
            "--data-raw",
            "{\"size\":",
        ],
        "/api/create",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["message"][0]
            .as_str()
            .is_some_and(|m| m.starts_with("Malformed JSON body")),
        "{}",
        r.body
    );
    let r = curl(
        &c,
        &[
            "-u",
            ADMIN,
            "-H",
            "Content-Type: text/plain",
            "--data-raw",
            "size=1",
        ],
        "/api/create",
    );
    assert_eq!(r.status, 415, "{}", r.body);
    assert_eq!(r.json()["message"].as_array().map(Vec::len), Some(1));
    assert_eq!(ids(&pd(&c, ADMIN, "GET", "/disks", &[])).len(), 2);

    // Unknown disks, routes and methods.
    let missing = "00000000-0000-4000-8000-000000000000";
    expect_error(&show(&c, ADMIN, missing), 400, &["Disk does not exists"]);
    expect_error(
        &show(&c, ADMIN, "not-a-uuid"),
        400,
        &["Disk does not exists"],
    );
    expect_error(
        &pd(&c, ADMIN, "DELETE", &format!("/disks/{missing}"), &[]),
        400,
        &["Disk does not exists"],
    );
    for path in ["", "/", "/disks/a/b", "/a/b/c"] {
        expect_error(
            &pd(&c, ADMIN, "GET", path, &[]),
            404,
            &["Unable to find requested resource."],
        );
    }
    expect_error(
        &pd(&c, ADMIN, "POST", "/disks", &["a=b"]),
        405,
        &["Method not allowed"],
    );
    expect_error(
        &pd(&c, ADMIN, "PUT", &format!("/disks/{a}"), &[]),
        405,
        &["Method not allowed"],
    );
    expect_error(
        &pd(&c, ADMIN, "GET", "/create", &[]),
        400,
        &["Method not allowed"],
    );

    // Delete: {"uuid": ...}, then it is gone.
    let r = pd(&c, ADMIN, "DELETE", &format!("/disks/{a}"), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({ "uuid": a }));
    expect_error(&show(&c, ADMIN, &a), 400, &["Disk does not exists"]);
    assert_eq!(ids(&pd(&c, ADMIN, "GET", "/disks", &[])), vec![b]);
}

#[test]
fn hotattach_attach_detach_targets_headers_and_user_limit() {
    let c = daemon();
    let d1 = create(&c, ADMIN, &["size=1", "tag=one", "visibility=private"]);
    let d2 = create(&c, ADMIN, &["size=1", "tag=two", "visibility=private"]);
    let vm = ["node=onehost-2.lal.in2p3.fr", "vm_id=722"];

    // hotattach: vda, then vdb; the uuid list is every disk of the VM.
    let r = pd(&c, ADMIN, "POST", &format!("/hotattach/{d1}"), &vm);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        format!(
            r#"{{"node":"onehost-2.lal.in2p3.fr","vm_id":"722","target":"vda","uuid":["{d1}"]}}"#
        )
    );
    assert_eq!(usage(&c, &d1), u("1", "1", "0"));
    // JSON body, numeric vm_id, names in another case: the same VM.
    let r = pd_json(
        &c,
        ADMIN,
        &format!("/hotattach/{d2}"),
        &json!({"NODE": "onehost-2.lal.in2p3.fr", "vm_id": 722}),
    );
    assert_eq!(
        r.body,
        format!(
            r#"{{"node":"onehost-2.lal.in2p3.fr","vm_id":"722","target":"vdb","uuid":["{d1}","{d2}"]}}"#
        )
    );

    // The user limit is enforced: no slot left -> refused, nothing changes.
    for action in ["hotattach", "attach"] {
        let r = pd(
            &c,
            ADMIN,
            "POST",
            &format!("/{action}/{d1}"),
            &["node=other", "vm_id=1"],
        );
        expect_error(&r, 400, &["Disk has no remaining user slot (limit 1)"]);
    }
    let r = pd(&c, ADMIN, "POST", &format!("/hotattach/{d1}"), &vm);
    expect_error(&r, 400, &["Disk is already attached to this VM"]);
    assert_eq!(usage(&c, &d1), u("1", "1", "0"));
    // In use: cannot be deleted.
    expect_error(
        &pd(&c, ADMIN, "DELETE", &format!("/disks/{d1}"), &[]),
        400,
        &["Can't remove the disk as it is in use"],
    );

    // hotdetach: the detached target, and the disks that remain.
    let r = pd(&c, ADMIN, "POST", &format!("/hotdetach/{d1}"), &vm);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        format!(
            r#"{{"node":"onehost-2.lal.in2p3.fr","vm_id":"722","target":"vda","uuid":["{d2}"]}}"#
        )
    );
    assert_eq!(usage(&c, &d1), u("0", "1", "1"));
    expect_error(
        &pd(&c, ADMIN, "POST", &format!("/hotdetach/{d1}"), &vm),
        400,
        &["Disk have not been hot-plugged"],
    );
    // vda is free again.
    let r = pd(&c, ADMIN, "POST", &format!("/hotattach/{d1}"), &vm);
    assert_eq!(r.json()["target"], "vda", "{}", r.body);

    // Static attach (at VM launch): no target; cannot be hot-detached.
    let d3 = create(
        &c,
        ADMIN,
        &[
            "size=1",
            "tag=three",
            "visibility=public",
            "multiattach=true",
        ],
    );
    let r = pd(
        &c,
        ADMIN,
        "POST",
        &format!("/attach/{d3}"),
        &["node=n9", "vm_id=9"],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        format!(r#"{{"node":"n9","vm_id":"9","uuid":["{d3}"]}}"#)
    );
    expect_error(
        &pd(
            &c,
            ADMIN,
            "POST",
            &format!("/hotdetach/{d3}"),
            &["node=n9", "vm_id=9"],
        ),
        400,
        &["Disk have not been hot-plugged"],
    );
    // A multi-attach disk takes a second VM.
    let r = pd(&c, ADMIN, "POST", &format!("/hotattach/{d3}"), &vm);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["target"], "vdc");
    let (users, limit, remaining) = usage(&c, &d3);
    assert_eq!(users, "2");
    assert_eq!(
        remaining.parse::<i64>().ok(),
        limit.parse::<i64>().ok().map(|l| l - 2)
    );

    // detach: every disk of the VM, answered as detached; then nothing is left.
    let r = pd(&c, ADMIN, "POST", "/detach", &vm);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["node"], "onehost-2.lal.in2p3.fr");
    assert_eq!(v["vm_id"], "722");
    assert!(v.get("target").is_none(), "{v}");
    let mut detached: Vec<String> = v["uuid"]
        .as_array()
        .expect("uuid list")
        .iter()
        .map(|s| s.as_str().expect("uuid").to_owned())
        .collect();
    detached.sort();
    let mut expected = vec![d1.clone(), d2.clone(), d3.clone()];
    expected.sort();
    assert_eq!(detached, expected);
    expect_error(
        &pd(&c, ADMIN, "POST", "/detach", &vm),
        400,
        &["VM don't have disk attached"],
    );
    assert_eq!(usage(&c, &d1), u("0", "1", "1"));
    assert_eq!(usage(&c, &d3).0, "1");
    // The original ignored a UUID after detach.
    let r = pd(
        &c,
        ADMIN,
        "POST",
        &format!("/detach/{d1}"),
        &["node=n9", "vm_id=9"],
    );
    assert_eq!(
        r.body,
        format!(r#"{{"node":"n9","vm_id":"9","uuid":["{d3}"]}}"#)
    );
    assert_eq!(usage(&c, &d3).0, "0");

    // Input errors: the original's messages; nothing attached by any of them.
    let hot = format!("/hotattach/{d1}");
    expect_error(
        &pd(&c, ADMIN, "POST", &hot, &["node=n"]),
        400,
        &["Missing input"],
    );
    expect_error(&pd(&c, ADMIN, "POST", &hot, &[]), 400, &["Missing input"]);
    expect_error(
        &pd(&c, ADMIN, "POST", &hot, &["node=n", "vm_id="]),
        400,
        &["Missing input"],
    );
    expect_error(
        &pd(&c, ADMIN, "POST", &hot, &["node=n", "vm_id=1", "x=2"]),
        400,
        &["Unknown input"],
    );
    let r = curl(
        &c,
        &[
            "-u",
            ADMIN,
            "-H",
            "Content-Type: application/xml",
            "--data-raw",
            "<vm/>",
        ],
        &format!("/api{hot}"),
    );
    assert_eq!(r.status, 415, "{}", r.body);
    expect_error(
        &pd(&c, ADMIN, "POST", &format!("/reboot/{d1}"), &vm),
        400,
        &["Requested action does not exist"],
    );
    expect_error(
        &pd(&c, ADMIN, "POST", "/reboot", &vm),
        400,
        &["Requested action does not exist"],
    );
    for action in ["attach", "hotattach", "hotdetach"] {
        expect_error(
            &pd(&c, ADMIN, "POST", &format!("/{action}"), &vm),
            400,
            &["Disk UUID not provided"],
        );
    }
    let missing = "00000000-0000-4000-8000-000000000000";
    for action in ["attach", "hotattach"] {
        expect_error(
            &pd(&c, ADMIN, "POST", &format!("/{action}/{missing}"), &vm),
            400,
            &["Bad disk UUID"],
        );
    }
    expect_error(
        &pd(&c, ADMIN, "POST", &format!("/hotdetach/{missing}"), &vm),
        404,
        &["Bad disk UUID"],
    );
    expect_error(
        &pd(&c, ADMIN, "GET", &format!("/hotattach/{d1}"), &[]),
        405,
        &["Method not allowed"],
    );
    assert_eq!(usage(&c, &d1), u("0", "1", "1"));
}

#[test]
fn hotattach_targets_stop_after_vdz() {
    let c = daemon();
    let vm = ["node=n", "vm_id=1"];
    for i in 0..26u8 {
        let d = create(&c, ADMIN, &["size=1", "tag=t", "visibility=private"]);
        let r = pd(&c, ADMIN, "POST", &format!("/hotattach/{d}"), &vm);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["target"], format!("vd{}", (b'a' + i) as char));
        assert_eq!(
            r.json()["uuid"].as_array().map(Vec::len),
            Some(usize::from(i) + 1)
        );
    }
    let d = create(&c, ADMIN, &["size=1", "tag=t", "visibility=private"]);
    expect_error(
        &pd(&c, ADMIN, "POST", &format!("/hotattach/{d}"), &vm),
        400,
        &["Target limit reached. Restart instance to attach new disk"],
    );
    assert_eq!(usage(&c, &d), u("0", "1", "1"));
    // A static attach needs no target name.
    let r = pd(&c, ADMIN, "POST", &format!("/attach/{d}"), &vm);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["uuid"].as_array().map(Vec::len), Some(27));
}

#[test]
fn a_second_user_sees_own_and_public_disks_only() {
    let c = daemon();
    let dir = c.data_dir().to_str().expect("utf8 path").to_owned();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--data-dir", dir.as_str()]);
        let (status, stdout, stderr) = run_cairn(&all);
        assert!(status.success(), "cairn {args:?}: {stdout}\n{stderr}");
    };
    cli(&["project", "create", "p2"]);
    cli(&[
        "user",
        "create",
        "bob",
        "--password",
        "bob-pw",
        "--project",
        "p2",
    ]);
    cli(&[
        "user",
        "create",
        "rita",
        "--password",
        "rita-pw",
        "--project",
        "p2",
        "--role",
        "reader",
    ]);
    let bob = "bob:bob-pw";

    let private = create(&c, ADMIN, &["size=1", "tag=mine", "visibility=private"]);
    let public = create(&c, ADMIN, &["size=1", "tag=shared", "visibility=public"]);
    let bobs = create(&c, bob, &["size=3", "tag=bob's", "visibility=private"]);
    let r = show(&c, bob, &bobs);
    assert_eq!(r.json()["owner"], "bob");

    // Bob lists his own disk and the public one; the admin sees all three.
    let mut listed = ids(&pd(&c, bob, "GET", "/disks", &[]));
    listed.sort();
    let mut expected = vec![public.clone(), bobs.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(ids(&pd(&c, ADMIN, "GET", "/disks", &[])).len(), 3);

    expect_error(
        &show(&c, bob, &private),
        400,
        &["Not enough rights to display disk properties"],
    );
    let r = show(&c, bob, &public);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["owner"], "admin");
    assert_eq!(show(&c, ADMIN, &bobs).status, 200);

    // Only the owner deletes, even a public disk; others' private disks cannot be attached.
    expect_error(
        &pd(&c, bob, "DELETE", &format!("/disks/{public}"), &[]),
        400,
        &["Not enough rights to delete disk"],
    );
    expect_error(
        &pd(&c, bob, "DELETE", &format!("/disks/{private}"), &[]),
        400,
        &["Not enough rights to delete disk"],
    );
    expect_error(
        &pd(
            &c,
            bob,
            "POST",
            &format!("/hotattach/{private}"),
            &["node=b", "vm_id=1"],
        ),
        400,
        &["Not enough rights to attach disk"],
    );
    expect_error(
        &pd(
            &c,
            bob,
            "POST",
            &format!("/hotdetach/{private}"),
            &["node=b", "vm_id=1"],
        ),
        400,
        &["Not enough rights to detach disk"],
    );
    assert_eq!(usage(&c, &private), u("0", "1", "1"));
    // A public disk may be used by anyone who sees it.
    let r = pd(
        &c,
        bob,
        "POST",
        &format!("/hotattach/{public}"),
        &["node=b", "vm_id=1"],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["target"], "vda");
    assert_eq!(usage(&c, &public), u("1", "1", "0"));

    // A VM belongs to the project that registered it: bob (project p2) may not attach his
    // disk to the admin's VM, nor detach the admin's disks from it, nor learn their ids.
    let admins_vm = ["node=a", "vm_id=1"];
    let r = pd(
        &c,
        ADMIN,
        "POST",
        &format!("/hotattach/{private}"),
        &admins_vm,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    expect_error(
        &pd(&c, bob, "POST", &format!("/hotattach/{bobs}"), &admins_vm),
        400,
        &["Not enough rights to attach disk"],
    );
    expect_error(
        &pd(&c, bob, "POST", "/detach", &admins_vm),
        400,
        &["Not enough rights to detach disks"],
    );
    assert_eq!(usage(&c, &private), u("1", "1", "0"));
    assert_eq!(usage(&c, &bobs), u("0", "1", "1"));
    let r = pd(&c, ADMIN, "POST", "/detach", &admins_vm);
    assert_eq!(r.status, 200, "{}", r.body);

    // A reader sees but does not create.
    let rita = "rita:rita-pw";
    // Visibility is per user, not per project: bob's private disk stays his.
    assert_eq!(
        ids(&pd(&c, rita, "GET", "/disks", &[])),
        vec![public.clone()]
    );
    expect_error(
        &pd(
            &c,
            rita,
            "POST",
            "/create",
            &["size=1", "tag=t", "visibility=private"],
        ),
        400,
        &["Not enough rights to create disk"],
    );

    // The admin may delete bob's disk.
    let r = pd(&c, ADMIN, "DELETE", &format!("/disks/{bobs}"), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    expect_error(&show(&c, bob, &bobs), 400, &["Disk does not exists"]);
}

#[test]
fn racing_hotattaches_respect_the_limit_and_never_share_a_target() {
    let c = std::sync::Arc::new(daemon());
    // Eight VMs race for one disk with one user slot: exactly one wins.
    let d = create(&c, ADMIN, &["size=1", "tag=race", "visibility=private"]);
    let replies: Vec<Reply> = (0..8)
        .map(|i| {
            let (c, d) = (c.clone(), d.clone());
            std::thread::spawn(move || {
                let vm = format!("vm_id={i}");
                pd(
                    &c,
                    ADMIN,
                    "POST",
                    &format!("/hotattach/{d}"),
                    &["node=race", &vm],
                )
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let wins = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(wins, 1, "{replies:?}");
    for r in replies.iter().filter(|r| r.status != 200) {
        expect_error(r, 400, &["Disk has no remaining user slot (limit 1)"]);
    }
    assert_eq!(usage(&c, &d), u("1", "1", "0"));

    // Eight disks race onto one VM: eight distinct targets vda..vdh.
    let disks: Vec<String> = (0..8)
        .map(|_| create(&c, ADMIN, &["size=1", "tag=t", "visibility=private"]))
        .collect();
    let mut targets: Vec<String> = disks
        .iter()
        .map(|d| {
            let (c, d) = (c.clone(), d.clone());
            std::thread::spawn(move || {
                pd(
                    &c,
                    ADMIN,
                    "POST",
                    &format!("/hotattach/{d}"),
                    &["node=one", "vm_id=1"],
                )
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| {
            let r = t.join().expect("thread");
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["target"].as_str().expect("target").to_owned()
        })
        .collect();
    targets.sort();
    let expected: Vec<String> = (b'a'..=b'h').map(|c| format!("vd{}", c as char)).collect();
    assert_eq!(targets, expected);
}

#[test]
fn disks_and_hot_plugs_survive_a_restart() {
    let tmp = temp_dir();
    let data = tmp.path().join("data");
    let mut c = Serve::new()
        .data_dir(&data)
        .arg("--admin-password")
        .arg(PW)
        .start();
    let d1 = create(
        &c,
        ADMIN,
        &["size=5", "tag=kept", "visibility=public", "color=red"],
    );
    let d2 = create(&c, ADMIN, &["size=1", "tag=second", "visibility=private"]);
    let r = pd(
        &c,
        ADMIN,
        "POST",
        &format!("/hotattach/{d1}"),
        &["node=n", "vm_id=1"],
    );
    assert_eq!(r.json()["target"], "vda", "{}", r.body);
    let before = show(&c, ADMIN, &d1).body;
    assert!(c.stop_with(libc::SIGTERM).success());

    // The password is bootstrapped once; the restarted daemon keeps it.
    let c = Serve::new().data_dir(&data).start();
    assert_eq!(show(&c, ADMIN, &d1).body, before);
    assert_eq!(show(&c, ADMIN, &d1).json()["color"], "red");
    assert_eq!(usage(&c, &d1), u("1", "1", "0"));
    // The VM still holds vda: the next hot-plug gets vdb.
    let r = pd(
        &c,
        ADMIN,
        "POST",
        &format!("/hotattach/{d2}"),
        &["node=n", "vm_id=1"],
    );
    assert_eq!(
        r.body,
        format!(r#"{{"node":"n","vm_id":"1","target":"vdb","uuid":["{d1}","{d2}"]}}"#)
    );
}
