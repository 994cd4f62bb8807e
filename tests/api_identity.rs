//! Identity (Keystone v3 subset) against the real daemon: the real `openstack` CLI through
//! the clouds.yaml written at bootstrap, and raw HTTP for exact bodies, codes and error paths.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{Cairn, Serve, temp_dir};
use serde_json::{Value, json};
use sha2::Digest;

// ---- harness --------------------------------------------------------------------------------

/// The pinned OpenStack clients. Missing clients fail the test (run scripts/setup-test-deps).
fn openstack_bin() -> PathBuf {
    let venv = std::env::var_os("CAIRN_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/cairn/test-venv")
        });
    let bin = venv.join("bin/openstack");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/setup-test-deps",
        bin.display()
    );
    bin
}

struct Cli {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Cli {
    fn json(&self) -> Value {
        assert!(self.status.success(), "openstack failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// `openstack --os-cloud cairn <args>` with the daemon's clouds.yaml and nothing from the
/// developer's environment. `extra` overrides the cloud's settings (e.g. another user).
fn openstack(cairn: &Cairn, extra: &[&str], args: &[&str]) -> Cli {
    let mut cmd = Command::new(openstack_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OS_") {
            cmd.env_remove(&k);
        }
    }
    let out = cmd
        .env(
            "OS_CLIENT_CONFIG_FILE",
            cairn.data_dir().join("clouds.yaml"),
        )
        // clouds.yaml alone: its auth_url follows the daemon's port across restarts.
        .args(["--os-cloud", "cairn"])
        .args(extra)
        .args(args)
        .output()
        .expect("run openstack");
    Cli {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Asserts a Keystone error body with this code.
    fn assert_error(&self, code: u16, title: &str) -> String {
        assert_eq!(self.status, code, "{self:?}");
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{self:?}");
        assert_eq!(v["error"]["title"], title, "{self:?}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{self:?}");
        v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {self:?}"))
            .to_owned()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        // `GET /` answers 300 (Keystone's version list) without a Location.
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// One request with optional token headers and body.
fn call(
    cairn: &Cairn,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let url = cairn.url(path);
    let req = ureq::http::Request::builder().method(method).uri(&url);
    let req = headers.iter().fold(req, |r, (k, v)| r.header(*k, *v));
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(b.as_bytes().to_vec()),
        None => req.body(Vec::new()),
    }
    .expect("request");
    let mut resp = agent()
        .run(req)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}\n--- logs ---\n{}", cairn.logs.text()));
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let body = if method == "HEAD" {
        String::new()
    } else {
        resp.body_mut().read_to_string().expect("body")
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn password_body(user: &str, password: &str, project: Option<&str>) -> String {
    let mut b = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": user, "domain": {"name": "Default"}, "password": password}}}}});
    if let Some(p) = project {
        b["auth"]["scope"] = json!({"project": {"name": p, "domain": {"name": "Default"}}});
    }
    b.to_string()
}

/// POST /v3/auth/tokens with a password; returns (token, body).
fn login(cairn: &Cairn, user: &str, password: &str, project: Option<&str>) -> (String, Value) {
    let r = call(
        cairn,
        "POST",
        "/v3/auth/tokens",
        &[],
        Some(&password_body(user, password, project)),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let token = r
        .header("x-subject-token")
        .expect("X-Subject-Token")
        .to_owned();
    (token, r.json())
}

/// The admin password from clouds.yaml (a JSON-quoted YAML scalar).
fn clouds_password(data_dir: &Path) -> String {
    let text = std::fs::read_to_string(data_dir.join("clouds.yaml")).expect("clouds.yaml");
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("password: "))
        .expect("password line");
    serde_json::from_str(line).expect("quoted password")
}

fn role_names(token_body: &Value) -> Vec<String> {
    let mut v: Vec<String> = token_body["token"]["roles"]
        .as_array()
        .expect("roles")
        .iter()
        .map(|r| r["name"].as_str().expect("role name").to_owned())
        .collect();
    v.sort();
    v
}

fn ts(s: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        s.as_str().expect("timestamp string"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339")
}

const AUTH_REQUIRED: &str = "The request you have made requires authentication.";

// ---- tests ----------------------------------------------------------------------------------

#[test]
fn openstack_cli_manages_projects_users_and_roles() {
    let cairn = Serve::new().start();
    let clouds = cairn.data_dir().join("clouds.yaml");
    let mode = std::fs::metadata(&clouds)
        .expect("clouds.yaml")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "clouds.yaml mode {mode:o}");
    let password = clouds_password(cairn.data_dir());
    assert_eq!(password.len(), 24, "generated password {password:?}");
    assert!(
        !cairn.logs.text().contains(&password),
        "the password must never be logged"
    );
    assert!(cairn.logs.contains("clouds.yaml"), "{}", cairn.logs.text());

    // token issue straight from clouds.yaml
    let tok = openstack(&cairn, &[], &["token", "issue", "-f", "json"]).json();
    let admin_project = call(
        &cairn,
        "GET",
        "/v3/projects/admin",
        &[("X-Auth-Token", tok["id"].as_str().expect("id"))],
        None,
    )
    .json();
    assert_eq!(tok["project_id"], admin_project["project"]["id"]);

    // Compute through the catalog: no listed service may break the client's discovery.
    let servers = openstack(&cairn, &[], &["server", "list", "-n", "-f", "json"]).json();
    assert_eq!(servers, serde_json::json!([]));

    // projects
    let p = openstack(
        &cairn,
        &[],
        &[
            "project",
            "create",
            "-f",
            "json",
            "--description",
            "d1",
            "demo",
        ],
    )
    .json();
    assert_eq!(p["name"], "demo");
    assert_eq!(p["description"], "d1");
    assert_eq!(p["domain_id"], "default");
    assert_eq!(p["enabled"], true);
    let project_id = p["id"].as_str().expect("id").to_owned();
    let dup = openstack(&cairn, &[], &["project", "create", "demo"]);
    assert!(
        !dup.status.success() && dup.stderr.contains("409"),
        "{}",
        dup.stderr
    );
    let list = openstack(&cairn, &[], &["project", "list", "-f", "json"]).json();
    let mut names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["Name"].as_str().expect("Name"))
        .collect();
    names.sort();
    assert_eq!(names, ["admin", "demo"]);
    let shown = openstack(&cairn, &[], &["project", "show", "-f", "json", "demo"]).json();
    assert_eq!(shown["id"], project_id.as_str());

    // users
    let u = openstack(
        &cairn,
        &[],
        &[
            "user",
            "create",
            "-f",
            "json",
            "--project",
            "demo",
            "--password",
            "pw-alice",
            "alice",
        ],
    )
    .json();
    assert_eq!(u["name"], "alice");
    assert_eq!(u["default_project_id"], project_id.as_str());
    let user_id = u["id"].as_str().expect("id").to_owned();
    let users = openstack(&cairn, &[], &["user", "list", "-f", "json"]).json();
    let mut names: Vec<&str> = users
        .as_array()
        .expect("list")
        .iter()
        .map(|u| u["Name"].as_str().expect("Name"))
        .collect();
    names.sort();
    assert_eq!(names, ["admin", "alice"]);
    let shown = openstack(&cairn, &[], &["user", "show", "-f", "json", "alice"]).json();
    assert_eq!(shown["id"], user_id.as_str());

    // no role yet: alice cannot get a token for demo
    let alice = [
        "--os-username",
        "alice",
        "--os-password",
        "pw-alice",
        "--os-project-name",
        "demo",
    ];
    let denied = openstack(&cairn, &alice, &["token", "issue"]);
    assert!(
        !denied.status.success() && denied.stderr.contains("401"),
        "{}",
        denied.stderr
    );

    // roles
    let roles = openstack(&cairn, &[], &["role", "list", "-f", "json"]).json();
    let mut names: Vec<&str> = roles
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["Name"].as_str().expect("Name"))
        .collect();
    names.sort();
    assert_eq!(names, ["admin", "member", "reader"]);
    let add = openstack(
        &cairn,
        &[],
        &[
            "role",
            "add",
            "--project",
            "demo",
            "--user",
            "alice",
            "member",
        ],
    );
    assert!(add.status.success(), "{}", add.stderr);
    let assigned = openstack(
        &cairn,
        &[],
        &[
            "role",
            "assignment",
            "list",
            "--project",
            "demo",
            "--names",
            "-f",
            "json",
        ],
    )
    .json();
    assert_eq!(assigned.as_array().map(Vec::len), Some(1), "{assigned}");
    assert_eq!(assigned[0]["Role"], "member");
    assert_eq!(assigned[0]["User"], "alice@Default");
    assert_eq!(assigned[0]["Project"], "demo@Default");
    let by_id = openstack(
        &cairn,
        &[],
        &[
            "role",
            "assignment",
            "list",
            "--project",
            "demo",
            "-f",
            "json",
        ],
    )
    .json();
    assert_eq!(by_id[0]["User"], user_id.as_str());
    assert_eq!(by_id[0]["Project"], project_id.as_str());

    // alice's token, scoped to demo, carries member (and the reader it implies), not admin
    let t = openstack(&cairn, &alice, &["token", "issue", "-f", "json"]).json();
    assert_eq!(t["project_id"], project_id.as_str());
    assert_eq!(t["user_id"], user_id.as_str());
    let (alice_token, body) = login(&cairn, "alice", "pw-alice", Some("demo"));
    assert_eq!(role_names(&body), ["member", "reader"]);
    // unscoped: the default project
    let (_, body) = login(&cairn, "alice", "pw-alice", None);
    assert_eq!(body["token"]["project"]["id"], project_id.as_str());

    // a member may not create projects (CLI and exact body)
    let refused = openstack(&cairn, &alice, &["project", "create", "nope"]);
    assert!(
        !refused.status.success() && refused.stderr.contains("403"),
        "{}",
        refused.stderr
    );
    let r = call(
        &cairn,
        "POST",
        "/v3/projects",
        &[("X-Auth-Token", &alice_token)],
        Some(r#"{"project": {"name": "nope"}}"#),
    );
    assert_eq!(
        r.assert_error(403, "Forbidden"),
        "You are not authorized to perform the requested action: identity:create_project."
    );
    // ...sees its own project and user, and the projects it holds roles on, nothing else
    let own = openstack(&cairn, &alice, &["project", "show", "-f", "json", "demo"]).json();
    assert_eq!(own["id"], project_id.as_str());
    let mine = openstack(&cairn, &alice, &["project", "list", "-f", "json"]).json();
    assert_eq!(mine.as_array().map(Vec::len), Some(1), "{mine}");
    assert_eq!(mine[0]["Name"], "demo");
    let h = [("X-Auth-Token", alice_token.as_str())];
    for path in [
        "/v3/projects",
        "/v3/projects/admin",
        "/v3/users",
        "/v3/roles",
        "/v3/role_assignments",
    ] {
        call(&cairn, "GET", path, &h, None).assert_error(403, "Forbidden");
    }
    assert_eq!(
        call(&cairn, "GET", &format!("/v3/users/{user_id}"), &h, None).status,
        200
    );
    call(&cairn, "GET", "/v3/users/admin", &h, None).assert_error(403, "Forbidden");
    call(
        &cairn,
        "PUT",
        &format!("/v3/projects/{project_id}/users/{user_id}/roles/admin"),
        &h,
        None,
    )
    .assert_error(403, "Forbidden");
    assert!(
        !openstack(&cairn, &alice, &["user", "list"])
            .status
            .success()
    );

    // deleting the user ends its tokens; deleting the project works once it is unused
    let del = openstack(&cairn, &[], &["user", "delete", "alice"]);
    assert!(del.status.success(), "{}", del.stderr);
    call(&cairn, "GET", "/v3/auth/catalog", &h, None).assert_error(401, "Unauthorized");
    let users = openstack(&cairn, &[], &["user", "list", "-f", "json"]).json();
    assert_eq!(users.as_array().map(Vec::len), Some(1), "{users}");
    let del = openstack(&cairn, &[], &["project", "delete", "demo"]);
    assert!(del.status.success(), "{}", del.stderr);
    let gone = openstack(&cairn, &[], &["project", "show", "demo"]);
    assert!(
        !gone.status.success() && gone.stderr.contains("No Project found for demo"),
        "{}",
        gone.stderr
    );
    let list = openstack(&cairn, &[], &["project", "list", "-f", "json"]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
}

#[test]
fn discovery_documents() {
    let cairn = Serve::new().start();
    let base = cairn.url("");
    let doc = json!({
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{base}/v3/")}],
        "media-types": [{"base": "application/json",
                         "type": "application/vnd.openstack.identity-v3+json"}],
    });
    let r = call(&cairn, "GET", "/", &[], None);
    assert_eq!(r.status, 300, "{r:?}");
    assert_eq!(r.json(), json!({"versions": {"values": [doc.clone()]}}));
    for path in ["/v3", "/v3/"] {
        let r = call(&cairn, "GET", path, &[], None);
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json"))
        );
        assert_eq!(r.json(), json!({"version": doc.clone()}));
    }
}

#[test]
fn token_issue_validate_rescope_revoke_and_errors() {
    let cairn = Serve::new().start();
    let base = cairn.url("");
    let password = clouds_password(cairn.data_dir());

    let (token, body) = login(&cairn, "admin", &password, Some("admin"));
    assert_eq!(token.len(), 43, "32 bytes base64url: {token}");
    let t = &body["token"];
    assert_eq!(t["methods"], json!(["password"]));
    assert_eq!(t["user"]["name"], "admin");
    assert_eq!(
        t["user"]["domain"],
        json!({"id": "default", "name": "Default"})
    );
    assert_eq!(t["project"]["name"], "admin");
    assert_eq!(
        t["project"]["domain"],
        json!({"id": "default", "name": "Default"})
    );
    assert_eq!(t["is_domain"], false);
    assert_eq!(role_names(&body), ["admin", "member", "reader"]);
    assert_eq!(t["audit_ids"].as_array().map(Vec::len), Some(1));
    let issued = ts(&t["issued_at"]);
    let expires = ts(&t["expires_at"]);
    assert_eq!(expires - issued, time::Duration::seconds(3600));
    assert!(
        t["expires_at"]
            .as_str()
            .is_some_and(|s| s.len() == 27 && s.ends_with('Z'))
    );
    let project_id = t["project"]["id"].as_str().expect("project id").to_owned();
    // the catalog points at this daemon
    let url_of = |ty: &str| {
        let svc = t["catalog"]
            .as_array()
            .expect("catalog")
            .iter()
            .find(|s| s["type"] == ty)
            .unwrap_or_else(|| panic!("no {ty} in {}", t["catalog"]));
        let ep = svc["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["interface"] == "public")
            .expect("public endpoint");
        assert_eq!(ep["region_id"], "RegionOne");
        ep["url"].as_str().expect("url").to_owned()
    };
    assert_eq!(url_of("identity"), format!("{base}/v3"));
    assert_eq!(
        url_of("compute"),
        format!("{base}/compute/v2.1/{project_id}")
    );
    assert_eq!(url_of("image"), format!("{base}/image"));
    // Only served APIs are listed (clients probe each one).
    let types: Vec<&str> = t["catalog"]
        .as_array()
        .expect("catalog")
        .iter()
        .map(|s| s["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "identity",
            "compute",
            "image",
            "block-storage",
            "volumev3",
            "volumev2"
        ]
    );
    assert_eq!(
        url_of("block-storage"),
        format!("{base}/volume/v3/{project_id}")
    );

    // Every endpoint's root answers its own service's version discovery (clients strip the
    // version and project from the catalog URL and ask there).
    let root_doc = |path: &str| {
        let r = call(&cairn, "GET", path, &[], None);
        assert!(r.status == 200 || r.status == 300, "{path}: {r:?}");
        serde_json::from_str::<Value>(&r.body).expect("JSON")
    };
    let keystone = root_doc("/");
    assert_eq!(keystone["versions"]["values"][0]["id"], "v3.14");
    let nova = root_doc("/compute/");
    let ids: Vec<&str> = nova["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["v2.0", "v2.1"]);
    assert_eq!(
        nova["versions"][1]["links"][0]["href"]
            .as_str()
            .map(|h| h.ends_with("/compute/v2.1/")),
        Some(true),
        "{nova}"
    );
    let cinder = root_doc("/volume/");
    assert_eq!(cinder["versions"][1]["id"], "v3.0", "{cinder}");
    let glance = root_doc("/image");
    assert_eq!(glance["versions"][0]["id"], "v2.17");
    assert!(
        glance["versions"][0]["links"][0]["href"]
            .as_str()
            .is_some_and(|h| h.ends_with("/image/v2/")),
        "{glance}"
    );

    // validate (GET), check (HEAD), catalog
    let auth = [
        ("X-Auth-Token", token.as_str()),
        ("X-Subject-Token", token.as_str()),
    ];
    let r = call(&cairn, "GET", "/v3/auth/tokens", &auth, None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-subject-token"), Some(token.as_str()));
    assert_eq!(r.json(), body);
    let r = call(&cairn, "GET", "/v3/auth/tokens?nocatalog", &auth, None);
    assert!(r.json()["token"].get("catalog").is_none(), "{r:?}");
    assert_eq!(
        call(&cairn, "HEAD", "/v3/auth/tokens", &auth, None).status,
        200
    );
    let r = call(&cairn, "GET", "/v3/auth/catalog", &auth[..1], None);
    assert_eq!(r.json()["catalog"], t["catalog"]);

    // the token method: same user, methods grow, expiry never extends
    let rescope = json!({"auth": {"identity": {"methods": ["token"], "token": {"id": token}},
        "scope": {"project": {"id": project_id}}}});
    let r = call(
        &cairn,
        "POST",
        "/v3/auth/tokens",
        &[],
        Some(&rescope.to_string()),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let second = r.header("x-subject-token").expect("token").to_owned();
    assert_ne!(second, token);
    let b = r.json();
    assert_eq!(b["token"]["methods"], json!(["password", "token"]));
    assert_eq!(b["token"]["user"]["id"], t["user"]["id"]);
    assert!(ts(&b["token"]["expires_at"]) <= expires);

    // revoke: 204, then the token is refused everywhere
    let r = call(
        &cairn,
        "DELETE",
        "/v3/auth/tokens",
        &[("X-Auth-Token", &token), ("X-Subject-Token", &second)],
        None,
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = call(
        &cairn,
        "GET",
        "/v3/projects",
        &[("X-Auth-Token", &second)],
        None,
    );
    assert_eq!(r.assert_error(401, "Unauthorized"), AUTH_REQUIRED);
    assert_eq!(
        r.header("www-authenticate"),
        Some(format!("Keystone uri=\"{base}\"").as_str())
    );
    let subject = [
        ("X-Auth-Token", token.as_str()),
        ("X-Subject-Token", second.as_str()),
    ];
    call(&cairn, "GET", "/v3/auth/tokens", &subject, None).assert_error(404, "Not Found");
    assert_eq!(
        call(&cairn, "HEAD", "/v3/auth/tokens", &subject, None).status,
        404
    );
    call(&cairn, "DELETE", "/v3/auth/tokens", &subject, None).assert_error(404, "Not Found");
    let r = call(
        &cairn,
        "POST",
        "/v3/auth/tokens",
        &[],
        Some(
            &json!({"auth": {"identity": {"methods": ["token"], "token": {"id": second}}}})
                .to_string(),
        ),
    );
    r.assert_error(401, "Unauthorized");
    // the first token is untouched
    assert_eq!(
        call(
            &cairn,
            "GET",
            "/v3/projects",
            &[("X-Auth-Token", &token)],
            None
        )
        .status,
        200
    );

    // authentication failures all look alike
    let post = |b: &str| call(&cairn, "POST", "/v3/auth/tokens", &[], Some(b));
    for body in [
        password_body("admin", "wrong", Some("admin")),
        password_body("nobody", &password, Some("admin")),
        password_body("admin", &password, Some("nosuchproject")),
    ] {
        assert_eq!(post(&body).assert_error(401, "Unauthorized"), AUTH_REQUIRED);
    }
    assert_eq!(
        post(&password_body("admin", "wrong", None)).assert_error(401, "Unauthorized"),
        AUTH_REQUIRED
    );
    assert_eq!(
        post(&password_body("nobody", "x", None)).assert_error(401, "Unauthorized"),
        AUTH_REQUIRED
    );
    let other_domain = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": "admin", "domain": {"name": "Other"}, "password": password}}}}});
    post(&other_domain.to_string()).assert_error(401, "Unauthorized");
    post(r#"{"auth": {"identity": {"methods": ["totp"]}}}"#).assert_error(401, "Unauthorized");
    // malformed requests: 400, nothing issued
    for bad in [
        "{",
        "",
        "[]",
        r#"{"auth": {}}"#,
        r#"{"auth": {"identity": {"methods": []}}}"#,
        r#"{"auth": {"identity": {"methods": ["password"]}}}"#,
        r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "admin", "password": "x"}}}}}"#,
        r#"{"auth": {"identity": {"methods": "password"}}}"#,
    ] {
        post(bad).assert_error(400, "Bad Request");
    }
    // missing or unknown tokens
    for h in [
        &[][..],
        &[("X-Auth-Token", "")][..],
        &[("X-Auth-Token", "nope")][..],
    ] {
        let r = call(&cairn, "GET", "/v3/projects", h, None);
        assert_eq!(r.assert_error(401, "Unauthorized"), AUTH_REQUIRED);
    }
    call(
        &cairn,
        "GET",
        "/v3/auth/tokens",
        &[("X-Auth-Token", &token)],
        None,
    )
    .assert_error(400, "Bad Request");
    // malformed JSON and bad fields on the management routes
    let h = [("X-Auth-Token", token.as_str())];
    for bad in [
        "{",
        r#"{"project": {}}"#,
        r#"{"project": {"name": 7}}"#,
        r#"{"project": {"name": " "}}"#,
        r#"{"project": {"name": "x", "domain_id": "other"}}"#,
    ] {
        call(&cairn, "POST", "/v3/projects", &h, Some(bad)).assert_error(400, "Bad Request");
    }
    for bad in [
        "{",
        r#"{"user": {"password": "x"}}"#,
        r#"{"user": {"name": "bob", "default_project_id": "nosuch"}}"#,
    ] {
        call(&cairn, "POST", "/v3/users", &h, Some(bad)).assert_error(400, "Bad Request");
    }
    let r = call(&cairn, "GET", "/v3/users", &h, None).json();
    assert_eq!(
        r["users"].as_array().map(Vec::len),
        Some(1),
        "nothing was created: {r}"
    );
    call(&cairn, "GET", "/v3/projects/nosuch", &h, None).assert_error(404, "Not Found");
    call(&cairn, "DELETE", "/v3/users/nosuch", &h, None).assert_error(404, "Not Found");
    call(
        &cairn,
        "PUT",
        &format!("/v3/projects/{project_id}/users/nosuch/roles/member"),
        &h,
        None,
    )
    .assert_error(404, "Not Found");
    call(
        &cairn,
        "PUT",
        &format!("/v3/projects/{project_id}/users/admin/roles/owner"),
        &h,
        None,
    )
    .assert_error(404, "Not Found");
}

#[test]
fn grants_and_role_assignments_over_http() {
    let cairn = Serve::new().start();
    let password = clouds_password(cairn.data_dir());
    let (token, _) = login(&cairn, "admin", &password, Some("admin"));
    let h = [("X-Auth-Token", token.as_str())];
    let p = call(
        &cairn,
        "POST",
        "/v3/projects",
        &h,
        Some(r#"{"project": {"name": "p1"}}"#),
    );
    assert_eq!(p.status, 201, "{p:?}");
    let pid = p.json()["project"]["id"].as_str().expect("id").to_owned();
    let u = call(
        &cairn,
        "POST",
        "/v3/users",
        &h,
        Some(r#"{"user": {"name": "bob", "password": "pw-bob"}}"#),
    );
    assert_eq!(u.status, 201, "{u:?}");
    let uj = u.json();
    assert!(uj["user"].get("default_project_id").is_none(), "{uj}");
    let uid = uj["user"]["id"].as_str().expect("id").to_owned();
    let roles = call(&cairn, "GET", "/v3/roles?name=reader", &h, None).json();
    assert_eq!(roles["roles"].as_array().map(Vec::len), Some(1), "{roles}");
    let reader = roles["roles"][0]["id"].as_str().expect("id").to_owned();

    let grant = format!("/v3/projects/{pid}/users/{uid}/roles/{reader}");
    assert_eq!(call(&cairn, "HEAD", &grant, &h, None).status, 404);
    assert_eq!(call(&cairn, "PUT", &grant, &h, None).status, 204);
    assert_eq!(
        call(&cairn, "PUT", &grant, &h, None).status,
        204,
        "idempotent"
    );
    assert_eq!(call(&cairn, "HEAD", &grant, &h, None).status, 204);
    let listed = call(
        &cairn,
        "GET",
        &format!("/v3/projects/{pid}/users/{uid}/roles"),
        &h,
        None,
    )
    .json();
    assert_eq!(listed["roles"][0]["name"], "reader", "{listed}");
    let ra = call(
        &cairn,
        "GET",
        &format!("/v3/role_assignments?user.id={uid}"),
        &h,
        None,
    )
    .json();
    assert_eq!(
        ra["role_assignments"],
        json!([{"role": {"id": reader}, "user": {"id": uid}, "scope": {"project": {"id": pid}},
                "links": {"assignment": cairn.url(&grant)}}])
    );

    // bob: no default project, so an unscoped request is refused; scoped works as reader
    let r = call(
        &cairn,
        "POST",
        "/v3/auth/tokens",
        &[],
        Some(&password_body("bob", "pw-bob", None)),
    );
    r.assert_error(401, "Unauthorized");
    let (bob, body) = login(&cairn, "bob", "pw-bob", Some("p1"));
    assert_eq!(role_names(&body), ["reader"]);
    // a reader cannot revoke the admin's token, but can revoke its own
    let r = call(
        &cairn,
        "DELETE",
        "/v3/auth/tokens",
        &[("X-Auth-Token", &bob), ("X-Subject-Token", &token)],
        None,
    );
    r.assert_error(403, "Forbidden");
    // revoking the grant invalidates bob's token at once
    assert_eq!(call(&cairn, "DELETE", &grant, &h, None).status, 204);
    call(&cairn, "DELETE", &grant, &h, None).assert_error(404, "Not Found");
    call(
        &cairn,
        "GET",
        &format!("/v3/users/{uid}"),
        &[("X-Auth-Token", &bob)],
        None,
    )
    .assert_error(401, "Unauthorized");

    // domains
    let d = call(&cairn, "GET", "/v3/domains", &h, None).json();
    assert_eq!(d["domains"][0]["id"], "default");
    assert_eq!(d["domains"][0]["name"], "Default");
    assert_eq!(
        call(&cairn, "GET", "/v3/domains/default", &h, None).json()["domain"]["name"],
        "Default"
    );
    call(&cairn, "GET", "/v3/domains/other", &h, None).assert_error(404, "Not Found");
    // filters: python-openstackclient sends unset ones as "None"
    let r = call(&cairn, "GET", "/v3/users?domain_id=None&name=bob", &h, None).json();
    assert_eq!(r["users"].as_array().map(Vec::len), Some(1), "{r}");
    let r = call(&cairn, "GET", "/v3/projects?domain_id=other", &h, None).json();
    assert_eq!(r["projects"], json!([]));
}

#[test]
fn token_ttl_zero_issues_tokens_born_expired() {
    let cairn = Serve::new().arg("--token-ttl").arg("0").start();
    let password = clouds_password(cairn.data_dir());
    let (token, body) = login(&cairn, "admin", &password, Some("admin"));
    assert_eq!(body["token"]["expires_at"], body["token"]["issued_at"]);
    let r = call(
        &cairn,
        "GET",
        "/v3/projects",
        &[("X-Auth-Token", &token)],
        None,
    );
    assert_eq!(r.assert_error(401, "Unauthorized"), AUTH_REQUIRED);
}

fn digest(token: &str) -> String {
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn state_survives_a_restart_and_bootstrap_runs_once() {
    let tmp = temp_dir();
    let data = tmp.path().join("data");
    let mut cairn = Serve::new()
        .data_dir(&data)
        .env("CAIRN_ADMIN_PASSWORD", "Given-Pass:w0rd \"quoted\"")
        .start();
    assert_eq!(clouds_password(&data), "Given-Pass:w0rd \"quoted\"");
    assert!(
        !cairn.logs.text().contains("Given-Pass"),
        "{}",
        cairn.logs.text()
    );
    let tok = openstack(&cairn, &[], &["token", "issue", "-f", "json"]).json();
    let kept = tok["id"].as_str().expect("id").to_owned();
    let (expiring, _) = login(&cairn, "admin", "Given-Pass:w0rd \"quoted\"", Some("admin"));
    let h = [("X-Auth-Token", kept.as_str())];
    let u = call(
        &cairn,
        "POST",
        "/v3/users",
        &h,
        Some(r#"{"user": {"name": "carol", "password": "pw-c", "default_project_id": "admin"}}"#),
    );
    assert_eq!(u.status, 201, "{u:?}");
    assert_eq!(
        call(
            &cairn,
            "PUT",
            "/v3/projects/admin/users/carol/roles/member",
            &h,
            None
        )
        .status,
        204
    );
    let clouds_before = std::fs::read(data.join("clouds.yaml")).expect("clouds.yaml");
    assert!(cairn.stop_with(libc::SIGTERM).success());

    // Expire one token in the catalog while the daemon is down (a deterministic clock jump).
    let db = rusqlite::Connection::open(data.join("catalog.sqlite")).expect("catalog");
    let n = db
        .execute(
            "UPDATE tokens SET expires_at = '2000-01-01T00:00:00.000000Z' WHERE token_hash = ?1",
            [digest(&expiring)],
        )
        .expect("update");
    assert_eq!(n, 1, "the token is stored under its SHA-256 digest");
    let stored: i64 = db
        .query_row(
            "SELECT count(*) FROM tokens WHERE token_hash = ?1",
            [&kept],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(stored, 0, "the token itself is never stored");
    drop(db);

    // Restart with another password: it is ignored, nothing is bootstrapped again.
    let cairn = Serve::new()
        .data_dir(&data)
        .env("CAIRN_ADMIN_PASSWORD", "another")
        .start();
    assert!(
        !cairn.logs.contains("identity bootstrapped"),
        "{}",
        cairn.logs.text()
    );
    // The same credentials; only auth_url follows the new (random) port.
    let clouds_after = std::fs::read_to_string(data.join("clouds.yaml")).expect("clouds.yaml");
    let without_url = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.contains("auth_url:"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        without_url(&clouds_after),
        without_url(&String::from_utf8(clouds_before).expect("utf8"))
    );
    assert!(
        clouds_after.contains(&format!("auth_url: \"http://{}/v3\"", cairn.http())),
        "{clouds_after}"
    );
    let tok = openstack(&cairn, &[], &["token", "issue", "-f", "json"]).json();
    assert!(tok["id"].is_string(), "{tok}");
    let h = [("X-Auth-Token", kept.as_str())];
    let r = call(&cairn, "GET", "/v3/users?name=carol", &h, None);
    assert_eq!(r.status, 200, "token still valid after restart: {r:?}");
    assert_eq!(r.json()["users"].as_array().map(Vec::len), Some(1));
    let r = call(
        &cairn,
        "GET",
        "/v3/projects",
        &[("X-Auth-Token", &expiring)],
        None,
    );
    assert_eq!(r.assert_error(401, "Unauthorized"), AUTH_REQUIRED);
    let (_, body) = login(&cairn, "carol", "pw-c", None);
    assert_eq!(role_names(&body), ["member", "reader"]);
    // clouds.yaml still works (with the port of this run)
    let again = openstack(&cairn, &[], &["token", "issue", "-f", "json"]).json();
    assert_eq!(again["user_id"], tok["user_id"]);
    drop(cairn);

    // Without clouds.yaml and with the password unknown, the daemon says so.
    std::fs::remove_file(data.join("clouds.yaml")).expect("rm clouds.yaml");
    let cairn = Serve::new().data_dir(&data).start();
    assert!(
        cairn
            .logs
            .lines()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("clouds.yaml is missing")),
        "{}",
        cairn.logs.text()
    );
    assert!(!data.join("clouds.yaml").exists());
}

/// Removing the last admin (its project, its user, or its role assignment) is refused with a
/// 409 and changes nothing: schemathesis's stateful phase once deleted the admin project,
/// and from then on nobody could log in as an admin. Once another user holds admin, the old
/// admin may go.
#[test]
fn the_last_admin_cannot_be_removed() {
    let c = Serve::new().arg("--admin-password").arg("boot-pw").start();
    let (token, body) = login(&c, "admin", "boot-pw", Some("admin"));
    let admin_user = body["token"]["user"]["id"]
        .as_str()
        .expect("user id")
        .to_owned();
    let admin_project = body["token"]["project"]["id"]
        .as_str()
        .expect("project")
        .to_owned();
    let auth = [("x-auth-token", token.as_str())];
    let roles = call(&c, "GET", "/v3/roles?name=admin", &auth, None).json();
    let admin_role = roles["roles"][0]["id"].as_str().expect("role").to_owned();
    let grant = format!("/v3/projects/{admin_project}/users/{admin_user}/roles/{admin_role}");
    for (method, path) in [
        ("DELETE", format!("/v3/projects/{admin_project}")),
        ("DELETE", format!("/v3/users/{admin_user}")),
        ("DELETE", grant.clone()),
    ] {
        let msg = call(&c, method, &path, &auth, None).assert_error(409, "Conflict");
        assert!(msg.contains("admin"), "{msg}");
    }
    // Nothing changed: the admin still logs in, with its role.
    let (_, again) = login(&c, "admin", "boot-pw", Some("admin"));
    assert!(role_names(&again).contains(&"admin".to_owned()));
    // Another admin first; then the old one may go.
    let u = call(
        &c,
        "POST",
        "/v3/users",
        &auth,
        Some(r#"{"user": {"name": "second", "password": "second-pw"}}"#),
    );
    assert_eq!(u.status, 201, "{u:?}");
    let second = u.json()["user"]["id"].as_str().expect("id").to_owned();
    let path = format!("/v3/projects/{admin_project}/users/{second}/roles/{admin_role}");
    assert_eq!(call(&c, "PUT", &path, &auth, None).status, 204);
    assert_eq!(call(&c, "DELETE", &grant, &auth, None).status, 204);
    let (_, second_token) = login(&c, "second", "second-pw", Some("admin"));
    assert!(role_names(&second_token).contains(&"admin".to_owned()));
}

/// The daemon's anonymous memory, from /proc.
fn anonymous_kib(c: &Cairn) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", c.pid())).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Anonymous in smaps_rollup")
}

/// Password logins (argon2 works in 19 MiB each) leave no memory behind: glibc used to keep
/// every one resident (its adjusting mmap threshold), 19 MiB a login.
#[test]
fn password_logins_leave_no_memory_behind() {
    let cairn = Serve::new().arg("--admin-password").arg("mem-pw").start();
    let login = || common::admin_token(&cairn, "mem-pw");
    login();
    login();
    let before = anonymous_kib(&cairn);
    for _ in 0..6 {
        login();
    }
    let grown = anonymous_kib(&cairn).saturating_sub(before);
    assert!(grown < 19 << 10, "six logins left {grown} KiB resident");
}
