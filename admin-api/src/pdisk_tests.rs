//! Router tests of the pdisk family against an in-memory fake service: every error path and
//! shape. The daemon's real service is exercised by `tests/api_pdisk.rs`.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    body::Body,
    http::{HeaderMap, Request, StatusCode, header},
};
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use time::macros::datetime;
use tower::ServiceExt;

use crate::{AdminService, Health, StoreMetrics, VersionInfo, model::*, router};

#[derive(Default)]
struct Fake {
    volumes: Mutex<Vec<Volume>>,
    next: Mutex<u32>,
    broken: AtomicBool,
}

fn person(name: &str) -> Caller {
    Caller {
        user_id: format!("uid-{name}"),
        user_name: name.into(),
        project_id: format!("pid-{name}"),
        project_name: name.into(),
        roles: vec![if name == "admin" {
            Role::Admin
        } else {
            Role::Member
        }],
    }
}

fn vm_of(t: &AttachTarget) -> (String, String) {
    match t {
        AttachTarget::Vm { node, vm_id } => (node.clone(), vm_id.clone()),
        AttachTarget::Server(s) => (s.clone(), s.clone()),
    }
}

fn on_vm(a: &Attachment, vm: &(String, String)) -> bool {
    a.node.as_deref() == Some(&vm.0) && a.vm_id.as_deref() == Some(&vm.1)
}

impl Fake {
    fn check(&self) -> ServiceResult<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(ServiceError::Internal("disk on fire".into()));
        }
        Ok(())
    }
    fn visible(c: &Caller, v: &Volume) -> bool {
        c.is_admin()
            || v.owner.as_deref() == Some(&c.user_name)
            || v.visibility == Visibility::Public
    }
}

#[async_trait::async_trait]
impl AdminService for Fake {
    async fn health(&self) -> Health {
        Health::default()
    }
    fn version(&self) -> VersionInfo {
        VersionInfo {
            name: "cairn".into(),
            version: "0".into(),
            git_commit: None,
            store_format_version: 1,
            catalog_schema_version: 1,
        }
    }
    fn store_metrics(&self) -> StoreMetrics {
        StoreMetrics::default()
    }

    async fn validate_token(&self, token: &str) -> ServiceResult<TokenInfo> {
        if token != "tok-alice" {
            return Err(ServiceError::Unauthorized("bad token".into()));
        }
        Ok(TokenInfo {
            caller: person("alice"),
            role_ids: vec![],
            methods: vec!["password".into()],
            audit_id: "a".into(),
            issued_at: datetime!(2026-01-01 0:00 UTC),
            expires_at: datetime!(2027-01-01 0:00 UTC),
        })
    }

    async fn authenticate_basic(&self, user: &str, password: &str) -> ServiceResult<Caller> {
        match (user, password) {
            ("alice", "a") | ("bob", "b") | ("admin", "x") => Ok(person(user)),
            _ => Err(ServiceError::Unauthorized(
                "Invalid user name or password".into(),
            )),
        }
    }

    async fn create_volume(&self, caller: &Caller, new: NewVolume) -> ServiceResult<Volume> {
        self.check()?;
        let mut n = self.next.lock().expect("lock");
        *n += 1;
        let v = Volume {
            id: format!("00000000-0000-4000-8000-{:012}", *n),
            project_id: caller.project_id.clone(),
            user_id: Some(caller.user_id.clone()),
            owner: Some(caller.user_name.clone()),
            name: None,
            description: None,
            size_gib: new.size_gib,
            status: VolumeStatus::Available,
            volume_type: None,
            availability_zone: "nova".into(),
            snapshot_id: None,
            source_volume_id: None,
            source_image_id: None,
            bootable: false,
            multiattach: new.multiattach,
            visibility: new.visibility.unwrap_or(Visibility::Private),
            tag: new.tag,
            metadata: new.metadata,
            created_at: datetime!(2011-07-28 15:01:40.5 UTC),
            updated_at: datetime!(2011-07-28 15:01:40.5 UTC),
            attachments: vec![],
            user_limit: if new.multiattach { 2 } else { 1 },
            readonly: false,
            image_metadata: None,
        };
        self.volumes.lock().expect("lock").push(v.clone());
        Ok(v)
    }

    async fn list_volumes(
        &self,
        caller: &Caller,
        scope: VolumeScope,
    ) -> ServiceResult<Vec<Volume>> {
        self.check()?;
        assert_eq!(scope, VolumeScope::PdiskVisible);
        Ok(self
            .volumes
            .lock()
            .expect("lock")
            .iter()
            .filter(|v| Fake::visible(caller, v))
            .cloned()
            .collect())
    }

    async fn get_volume(
        &self,
        caller: &Caller,
        id: &str,
        pdisk_rules: bool,
    ) -> ServiceResult<Volume> {
        self.check()?;
        assert!(pdisk_rules);
        let vols = self.volumes.lock().expect("lock");
        let v = vols
            .iter()
            .find(|v| v.id == id)
            .ok_or_else(|| ServiceError::NotFound("no such volume".into()))?;
        if !Fake::visible(caller, v) {
            return Err(ServiceError::Forbidden("not yours".into()));
        }
        Ok(v.clone())
    }

    async fn delete_volume(
        &self,
        caller: &Caller,
        id: &str,
        pdisk_rules: bool,
    ) -> ServiceResult<()> {
        self.check()?;
        assert!(pdisk_rules);
        let mut vols = self.volumes.lock().expect("lock");
        let i = vols
            .iter()
            .position(|v| v.id == id)
            .ok_or_else(|| ServiceError::NotFound("no such volume".into()))?;
        if !caller.is_admin() && vols[i].owner.as_deref() != Some(&caller.user_name) {
            return Err(ServiceError::Forbidden("not yours".into()));
        }
        if !vols[i].attachments.is_empty() {
            return Err(ServiceError::Conflict("in use".into()));
        }
        vols.remove(i);
        Ok(())
    }

    async fn attach(&self, caller: &Caller, req: AttachRequest) -> ServiceResult<Attachment> {
        self.check()?;
        assert_eq!(req.naming, DeviceNaming::PdiskTarget);
        let vm = vm_of(&req.target);
        let mut vols = self.volumes.lock().expect("lock");
        let used: Vec<String> = vols
            .iter()
            .flat_map(|v| v.attachments.iter())
            .filter(|a| on_vm(a, &vm))
            .filter_map(|a| a.device.clone())
            .collect();
        let v = vols
            .iter_mut()
            .find(|v| v.id == req.volume_id)
            .ok_or_else(|| ServiceError::NotFound("no such volume".into()))?;
        if !Fake::visible(caller, v) {
            return Err(ServiceError::Forbidden("not yours".into()));
        }
        if v.users_remaining() < 1 {
            return Err(ServiceError::Conflict("full".into()));
        }
        let device = match req.kind {
            AttachKind::Static => Some("static".to_owned()),
            AttachKind::Hot => Some(
                (b'a'..=b'z')
                    .map(|c| format!("vd{}", c as char))
                    .find(|d| !used.contains(d))
                    .ok_or_else(|| ServiceError::OverLimit("no device".into()))?,
            ),
        };
        let a = Attachment {
            id: format!("att-{}", v.attachments.len()),
            volume_id: v.id.clone(),
            server_id: format!("{}/{}", vm.0, vm.1),
            device,
            kind: req.kind,
            attached_at: datetime!(2026-01-01 0:00 UTC),
            node: Some(vm.0),
            vm_id: Some(vm.1),
            nbd_uri: format!("nbd://127.0.0.1:10809/{}", v.id),
        };
        v.attachments.push(a.clone());
        Ok(a)
    }

    async fn detach(
        &self,
        _caller: &Caller,
        target: AttachTarget,
        volume_id: &str,
        hot_only: bool,
    ) -> ServiceResult<Attachment> {
        self.check()?;
        let vm = vm_of(&target);
        let mut vols = self.volumes.lock().expect("lock");
        let v = vols
            .iter_mut()
            .find(|v| v.id == volume_id)
            .ok_or_else(|| ServiceError::NotFound("no such volume".into()))?;
        let i = v
            .attachments
            .iter()
            .position(|a| on_vm(a, &vm))
            .ok_or_else(|| ServiceError::NotFound("not attached".into()))?;
        if hot_only && v.attachments[i].kind == AttachKind::Static {
            return Err(ServiceError::BadRequest("static".into()));
        }
        Ok(v.attachments.remove(i))
    }

    async fn detach_all(
        &self,
        _caller: &Caller,
        target: AttachTarget,
    ) -> ServiceResult<Vec<Attachment>> {
        self.check()?;
        let vm = vm_of(&target);
        let mut out = Vec::new();
        for v in self.volumes.lock().expect("lock").iter_mut() {
            let (gone, kept) = v.attachments.drain(..).partition(|a| on_vm(a, &vm));
            v.attachments = kept;
            out.extend::<Vec<Attachment>>(gone);
        }
        Ok(out)
    }

    async fn list_attachments(
        &self,
        _caller: &Caller,
        target: AttachTarget,
    ) -> ServiceResult<Vec<Attachment>> {
        self.check()?;
        let vm = vm_of(&target);
        Ok(self
            .volumes
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|v| v.attachments.iter())
            .filter(|a| on_vm(a, &vm))
            .cloned()
            .collect())
    }
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no header {name}"))
    }
    #[track_caller]
    fn error(&self, status: StatusCode, messages: &[&str]) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.json(), json!({ "message": messages }));
        assert!(self.header("content-type").starts_with("application/json"));
    }
}

struct Client {
    app: axum::Router,
    fake: Arc<Fake>,
}

const FORM: &str = "application/x-www-form-urlencoded";
const JSON: &str = "application/json";

impl Client {
    fn new() -> Client {
        let fake = Arc::new(Fake::default());
        Client {
            app: router(fake.clone()),
            fake,
        }
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        user: Option<&str>,
        ctype: Option<&str>,
        body: impl Into<Body>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(user) = user {
            if user.starts_with("tok-") {
                req = req.header("x-auth-token", user);
            } else {
                let pw = match user {
                    "alice" => "a",
                    "bob" => "b",
                    "admin" => "x",
                    _ => "wrong",
                };
                let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
                req = req.header(header::AUTHORIZATION, format!("Basic {b64}"));
            }
        }
        if let Some(ctype) = ctype {
            req = req.header(header::CONTENT_TYPE, ctype);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(body.into()).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Resp {
            status,
            headers,
            body: String::from_utf8(body.to_vec()).expect("utf8"),
        }
    }

    async fn get(&self, uri: &str, user: &str) -> Resp {
        self.send("GET", uri, Some(user), None, "").await
    }

    async fn form(&self, uri: &str, user: &str, body: &str) -> Resp {
        self.send("POST", uri, Some(user), Some(FORM), body.to_owned())
            .await
    }

    async fn create(&self, user: &str, body: &str) -> String {
        let r = self.form("/api/create", user, body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        r.json()["uuid"].as_str().expect("uuid").to_owned()
    }
}

#[tokio::test]
async fn authentication_is_required_and_answers_the_basic_challenge() {
    let c = Client::new();
    for (method, uri) in [
        ("GET", "/api/disks"),
        ("GET", "/api/disks/x"),
        ("DELETE", "/api/disks/x"),
        ("POST", "/api/create"),
        ("POST", "/api/detach"),
        ("POST", "/api/hotattach/x"),
    ] {
        for user in [None, Some("mallory"), Some("tok-bad")] {
            let r = c.send(method, uri, user, Some(FORM), "size=1").await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {uri} {user:?}"
            );
            assert_eq!(
                r.header("www-authenticate"),
                "Basic realm=\"Stratuslab Persistent Disk Storage\""
            );
            assert_eq!(r.json()["message"].as_array().map(Vec::len), Some(1));
        }
    }
    // Nothing was created by the refused calls.
    assert!(c.fake.volumes.lock().expect("lock").is_empty());
    // A token works as well as Basic.
    let r = c.get("/api/disks", "tok-alice").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "[]");
}

#[tokio::test]
async fn create_then_list_and_show_with_string_values_in_seed_order() {
    let c = Client::new();
    let id = c
        .create("alice", "size=2&tag=a+simple+disk&visibility=private")
        .await;
    let expected = format!(
        r#"{{"users":"0","created":"2011/07/28 15:01:40","visibility":"private","tag":"a simple disk","owner":"alice","uuid":"{id}","size":"2"}}"#
    );
    let r = c.get("/api/disks", "alice").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("content-type").starts_with("application/json"));
    assert_eq!(r.body, format!("[{expected}]"));

    let r = c.get(&format!("/api/disks/{id}"), "alice").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, expected);
    assert_eq!(r.header("x-diskuser-limit"), "1");
    assert_eq!(r.header("x-diskuser-remaining"), "1");

    // HEAD: same status and headers, no body.
    let r = c
        .send("HEAD", &format!("/api/disks/{id}"), Some("alice"), None, "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-diskuser-remaining"), "1");
    assert_eq!(r.body, "");
    let r = c
        .send("HEAD", "/api/disks/nope", Some("alice"), None, "")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn create_accepts_json_with_numbers_and_multiattach_and_extra_properties() {
    let c = Client::new();
    let r = c
        .send(
            "POST",
            "/api/create",
            Some("alice"),
            Some("application/json; charset=utf-8"),
            r#"{"size": 3, "tag": "j", "visibility": "public", "multiattach": true, "color": "blue"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let obj = r.json();
    assert_eq!(obj.as_object().map(|o| o.len()), Some(1));
    let id = obj["uuid"].as_str().expect("uuid");
    let r = c.get(&format!("/api/disks/{id}"), "alice").await;
    assert_eq!(r.json()["size"], "3");
    assert_eq!(r.json()["visibility"], "public");
    assert_eq!(r.json()["color"], "blue");
    assert_eq!(r.header("x-diskuser-limit"), "2");
    let stored = c.fake.volumes.lock().expect("lock")[0].clone();
    assert!(stored.multiattach);
    assert_eq!(stored.tag.as_deref(), Some("j"));

    // Form field names of create are case-insensitive too; size as a string in JSON.
    c.create("alice", "SIZE=1&Tag=&VISIBILITY=private").await;
    let r = c
        .send(
            "POST",
            "/api/create",
            Some("alice"),
            Some(JSON),
            r#"{"size": "4", "tag": "s", "visibility": "private"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn create_validation_collects_every_message_and_changes_nothing() {
    let c = Client::new();
    let cases: &[(&str, &[&str])] = &[
        (
            "size=abc&tag=t&visibility=secret",
            &[
                "Invalid disk visibility",
                "Size must be a valid positive integer",
            ],
        ),
        (
            "size=0&tag=t&visibility=private",
            &["Size must be an integer between 1 and 1024"],
        ),
        (
            "size=1025&tag=t&visibility=private",
            &["Size must be an integer between 1 and 1024"],
        ),
        (
            "size=-3&tag=t&visibility=public",
            &["Size must be an integer between 1 and 1024"],
        ),
        (
            "size=99999999999999999999999&tag=t&visibility=private",
            &["Size must be a valid positive integer"],
        ),
        (
            "size=1.5&tag=t&visibility=private",
            &["Size must be a valid positive integer"],
        ),
        (
            "size=+1+&tag=t&visibility=private",
            &["Size must be a valid positive integer"],
        ),
        (
            "",
            &[
                "Missing input: visibility",
                "Missing input: size",
                "Missing input: tag",
            ],
        ),
        (
            "size=1&tag=t&visibility=Private",
            &["Invalid disk visibility"],
        ),
        (
            "size=1&tag=t&visibility=private&multiattach=yes",
            &["Invalid multiattach value: use true or false"],
        ),
        (
            "size=1&tag=t&visibility=private&owner=bob",
            &["Property owner is set by the server"],
        ),
    ];
    for (body, messages) in cases {
        let r = c.form("/api/create", "alice", body).await;
        r.error(StatusCode::UNPROCESSABLE_ENTITY, messages);
    }
    let r = c
        .send(
            "POST",
            "/api/create",
            Some("alice"),
            Some(JSON),
            r#"{"size": 2.5, "tag": "t", "visibility": "private"}"#,
        )
        .await;
    r.error(
        StatusCode::UNPROCESSABLE_ENTITY,
        &["Size must be a valid positive integer"],
    );
    let r = c
        .send(
            "POST",
            "/api/create",
            Some("alice"),
            Some(JSON),
            r#"{"size": 1, "tag": null, "visibility": "private"}"#,
        )
        .await;
    r.error(StatusCode::UNPROCESSABLE_ENTITY, &["Missing input: tag"]);
    let long = "x".repeat(256);
    let r = c
        .form(
            "/api/create",
            "alice",
            &format!("size=1&tag={long}&visibility=private"),
        )
        .await;
    r.error(
        StatusCode::UNPROCESSABLE_ENTITY,
        &["Tag must be at most 255 characters"],
    );
    assert!(c.fake.volumes.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn malformed_bodies_and_media_types_are_client_errors() {
    let c = Client::new();
    let post = |ctype: Option<&'static str>, body: &'static str| {
        let c = &c;
        async move {
            c.send("POST", "/api/create", Some("alice"), ctype, body)
                .await
        }
    };
    let r = post(Some(JSON), "{not json").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["message"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with("Malformed JSON body")
    );
    let r = post(Some(JSON), "[1, 2]").await;
    r.error(
        StatusCode::BAD_REQUEST,
        &["Malformed JSON body: expected an object"],
    );
    let r = post(
        Some(JSON),
        r#"{"size": [1], "tag": "t", "visibility": "private"}"#,
    )
    .await;
    r.error(
        StatusCode::BAD_REQUEST,
        &["Invalid value for input size: expected a string or a number"],
    );
    let r = post(Some("text/plain"), "size=1").await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(r.json()["message"].as_array().map(Vec::len), Some(1));
    let r = post(None, "size=1&tag=t&visibility=private").await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = post(Some(FORM), "size=%ZZ").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);

    let big = format!("size=1&tag={}&visibility=private", "x".repeat(70 * 1024));
    let r = c.form("/api/create", "alice", &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["message"].as_array().map(Vec::len), Some(1));
    assert!(c.fake.volumes.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn visibility_owner_public_and_admin() {
    let c = Client::new();
    let private = c.create("alice", "size=1&tag=p&visibility=private").await;
    let public = c.create("alice", "size=1&tag=q&visibility=public").await;
    let bobs = c.create("bob", "size=1&tag=b&visibility=private").await;

    let ids = |r: Resp| -> Vec<String> {
        r.json()
            .as_array()
            .expect("array")
            .iter()
            .map(|d| d["uuid"].as_str().expect("uuid").to_owned())
            .collect()
    };
    assert_eq!(
        ids(c.get("/api/disks", "alice").await),
        vec![private.clone(), public.clone()]
    );
    assert_eq!(
        ids(c.get("/api/disks", "bob").await),
        vec![public.clone(), bobs.clone()]
    );
    assert_eq!(ids(c.get("/api/disks", "admin").await).len(), 3);

    c.get(&format!("/api/disks/{private}"), "bob").await.error(
        StatusCode::BAD_REQUEST,
        &["Not enough rights to display disk properties"],
    );
    assert_eq!(
        c.get(&format!("/api/disks/{public}"), "bob").await.status,
        StatusCode::OK
    );
    assert_eq!(
        c.get(&format!("/api/disks/{private}"), "admin")
            .await
            .status,
        StatusCode::OK
    );
    c.get("/api/disks/00000000-0000-0000-0000-000000000000", "alice")
        .await
        .error(StatusCode::BAD_REQUEST, &["Disk does not exists"]);

    // Only the owner (or an admin) deletes, even a public disk.
    let del = |id: &str, user: &'static str| {
        let uri = format!("/api/disks/{id}");
        let c = &c;
        async move { c.send("DELETE", &uri, Some(user), None, "").await }
    };
    del(&public, "bob").await.error(
        StatusCode::BAD_REQUEST,
        &["Not enough rights to delete disk"],
    );
    del("nope", "bob")
        .await
        .error(StatusCode::BAD_REQUEST, &["Disk does not exists"]);
    let r = del(&public, "alice").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, format!(r#"{{"uuid":"{public}"}}"#));
    let r = del(&bobs, "admin").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(ids(c.get("/api/disks", "admin").await), vec![private]);
}

#[tokio::test]
async fn hotattach_assigns_targets_and_headers_follow_users() {
    let c = Client::new();
    let d1 = c.create("alice", "size=1&tag=1&visibility=private").await;
    let d2 = c.create("alice", "size=1&tag=2&visibility=private").await;
    let vm = "node=onehost-2.lal.in2p3.fr&vm_id=722";

    let r = c.form(&format!("/api/hotattach/{d1}"), "alice", vm).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body,
        format!(
            r#"{{"node":"onehost-2.lal.in2p3.fr","vm_id":"722","target":"vda","uuid":["{d1}"]}}"#
        )
    );
    let r = c.get(&format!("/api/disks/{d1}"), "alice").await;
    assert_eq!(r.json()["users"], "1");
    assert_eq!(r.header("x-diskuser-limit"), "1");
    assert_eq!(r.header("x-diskuser-remaining"), "0");

    // Field names are case-insensitive; JSON with a numeric vm_id is the same VM.
    let r = c
        .send(
            "POST",
            &format!("/api/hotattach/{d2}"),
            Some("alice"),
            Some(JSON),
            r#"{"NODE": "onehost-2.lal.in2p3.fr", "Vm_Id": 722}"#,
        )
        .await;
    assert_eq!(
        r.body,
        format!(
            r#"{{"node":"onehost-2.lal.in2p3.fr","vm_id":"722","target":"vdb","uuid":["{d1}","{d2}"]}}"#
        )
    );

    // No user slot left: refused server-side, nothing changes.
    c.form(
        &format!("/api/hotattach/{d1}"),
        "alice",
        "node=other&vm_id=1",
    )
    .await
    .error(
        StatusCode::BAD_REQUEST,
        &["Disk has no remaining user slot (limit 1)"],
    );
    c.form(&format!("/api/attach/{d1}"), "alice", "node=other&vm_id=1")
        .await
        .error(
            StatusCode::BAD_REQUEST,
            &["Disk has no remaining user slot (limit 1)"],
        );
    c.form(&format!("/api/hotattach/{d1}"), "alice", vm)
        .await
        .error(
            StatusCode::BAD_REQUEST,
            &["Disk is already attached to this VM"],
        );

    // Deleting an attached disk is refused.
    c.send(
        "DELETE",
        &format!("/api/disks/{d1}"),
        Some("alice"),
        None,
        "",
    )
    .await
    .error(
        StatusCode::BAD_REQUEST,
        &["Can't remove the disk as it is in use"],
    );

    // hotdetach answers the detached target and the disks that remain.
    let r = c.form(&format!("/api/hotdetach/{d1}"), "alice", vm).await;
    assert_eq!(
        r.body,
        format!(
            r#"{{"node":"onehost-2.lal.in2p3.fr","vm_id":"722","target":"vda","uuid":["{d2}"]}}"#
        )
    );
    let r = c.get(&format!("/api/disks/{d1}"), "alice").await;
    assert_eq!(r.json()["users"], "0");
    assert_eq!(r.header("x-diskuser-remaining"), "1");
    // vda is free again.
    let r = c.form(&format!("/api/hotattach/{d1}"), "alice", vm).await;
    assert_eq!(r.json()["target"], "vda");
}

#[tokio::test]
async fn hotattach_stops_after_vdz() {
    let c = Client::new();
    let vm = "node=n&vm_id=1";
    for i in 0..26u8 {
        let d = c.create("alice", "size=1&tag=t&visibility=private").await;
        let r = c.form(&format!("/api/hotattach/{d}"), "alice", vm).await;
        assert_eq!(r.json()["target"], format!("vd{}", (b'a' + i) as char));
        assert_eq!(
            r.json()["uuid"].as_array().map(Vec::len),
            Some(usize::from(i) + 1)
        );
    }
    let d = c.create("alice", "size=1&tag=t&visibility=private").await;
    c.form(&format!("/api/hotattach/{d}"), "alice", vm)
        .await
        .error(
            StatusCode::BAD_REQUEST,
            &["Target limit reached. Restart instance to attach new disk"],
        );
    let r = c.get(&format!("/api/disks/{d}"), "alice").await;
    assert_eq!(r.json()["users"], "0");
}

#[tokio::test]
async fn static_attach_and_detach_of_a_vm() {
    let c = Client::new();
    let d1 = c.create("alice", "size=1&tag=1&visibility=private").await;
    let d2 = c
        .create("alice", "size=1&tag=2&visibility=private&multiattach=true")
        .await;
    let vm = "vm_id=9&node=n1";

    let r = c.form(&format!("/api/attach/{d1}"), "alice", vm).await;
    assert_eq!(
        r.body,
        format!(r#"{{"node":"n1","vm_id":"9","uuid":["{d1}"]}}"#)
    );
    let r = c.form(&format!("/api/attach/{d2}"), "alice", vm).await;
    assert_eq!(
        r.body,
        format!(r#"{{"node":"n1","vm_id":"9","uuid":["{d1}","{d2}"]}}"#)
    );
    // The multi-attach disk takes a second VM; its headers count both.
    let r = c
        .form(&format!("/api/hotattach/{d2}"), "alice", "node=n2&vm_id=9")
        .await;
    assert_eq!(r.json()["target"], "vda");
    let r = c.get(&format!("/api/disks/{d2}"), "alice").await;
    assert_eq!(
        (
            r.header("x-diskuser-limit"),
            r.header("x-diskuser-remaining")
        ),
        ("2", "0")
    );

    // A static attachment cannot be hot-detached.
    c.form(&format!("/api/hotdetach/{d1}"), "alice", vm)
        .await
        .error(StatusCode::BAD_REQUEST, &["Disk have not been hot-plugged"]);
    // Nor can a disk that is not on that VM.
    c.form(&format!("/api/hotdetach/{d1}"), "alice", "node=n2&vm_id=9")
        .await
        .error(StatusCode::BAD_REQUEST, &["Disk have not been hot-plugged"]);

    let r = c.form("/api/detach", "alice", vm).await;
    assert_eq!(
        r.body,
        format!(r#"{{"node":"n1","vm_id":"9","uuid":["{d1}","{d2}"]}}"#)
    );
    c.form("/api/detach", "alice", vm)
        .await
        .error(StatusCode::BAD_REQUEST, &["VM don't have disk attached"]);
    // The original ignored a UUID after detach.
    let r = c
        .form(&format!("/api/detach/{d2}"), "alice", "node=n2&vm_id=9")
        .await;
    assert_eq!(
        r.body,
        format!(r#"{{"node":"n2","vm_id":"9","uuid":["{d2}"]}}"#)
    );
    let r = c.get(&format!("/api/disks/{d2}"), "alice").await;
    assert_eq!(r.header("x-diskuser-remaining"), "2");
}

#[tokio::test]
async fn action_input_and_target_errors() {
    let c = Client::new();
    let d = c.create("alice", "size=1&tag=1&visibility=private").await;
    let hot = format!("/api/hotattach/{d}");
    c.form(&hot, "alice", "node=n")
        .await
        .error(StatusCode::BAD_REQUEST, &["Missing input"]);
    c.form(&hot, "alice", "")
        .await
        .error(StatusCode::BAD_REQUEST, &["Missing input"]);
    c.send("POST", &hot, Some("alice"), None, "")
        .await
        .error(StatusCode::BAD_REQUEST, &["Missing input"]);
    c.form(&hot, "alice", "node=n&node=m")
        .await
        .error(StatusCode::BAD_REQUEST, &["Missing input"]);
    c.form(&hot, "alice", "node=n&vm_id=")
        .await
        .error(StatusCode::BAD_REQUEST, &["Missing input"]);
    c.form(&hot, "alice", "node=n&vm_id=1&x=2")
        .await
        .error(StatusCode::BAD_REQUEST, &["Unknown input"]);
    let long = "n".repeat(256);
    c.form(&hot, "alice", &format!("node={long}&vm_id=1"))
        .await
        .error(
            StatusCode::BAD_REQUEST,
            &["Input too long: node and vm_id are at most 255 bytes"],
        );
    c.form(&hot, "alice", "node=n&vmid=1")
        .await
        .error(StatusCode::BAD_REQUEST, &["Unknown input"]);
    c.send(
        "POST",
        &hot,
        Some("alice"),
        Some(JSON),
        r#"{"node": "n", "vm_id": null}"#,
    )
    .await
    .error(StatusCode::BAD_REQUEST, &["Missing input"]);
    c.form(&format!("/api/reboot/{d}"), "alice", "node=n&vm_id=1")
        .await
        .error(
            StatusCode::BAD_REQUEST,
            &["Requested action does not exist"],
        );
    c.form("/api/reboot", "alice", "node=n&vm_id=1")
        .await
        .error(
            StatusCode::BAD_REQUEST,
            &["Requested action does not exist"],
        );
    for action in ["attach", "hotattach", "hotdetach"] {
        c.form(&format!("/api/{action}"), "alice", "node=n&vm_id=1")
            .await
            .error(StatusCode::BAD_REQUEST, &["Disk UUID not provided"]);
    }
    for action in ["attach", "hotattach"] {
        c.form(&format!("/api/{action}/nope"), "alice", "node=n&vm_id=1")
            .await
            .error(StatusCode::BAD_REQUEST, &["Bad disk UUID"]);
    }
    c.form("/api/hotdetach/nope", "alice", "node=n&vm_id=1")
        .await
        .error(StatusCode::NOT_FOUND, &["Bad disk UUID"]);
    c.form(&hot, "bob", "node=n&vm_id=1").await.error(
        StatusCode::BAD_REQUEST,
        &["Not enough rights to attach disk"],
    );
    c.form(&format!("/api/hotdetach/{d}"), "bob", "node=n&vm_id=1")
        .await
        .error(
            StatusCode::BAD_REQUEST,
            &["Not enough rights to detach disk"],
        );
    let r = c
        .send("POST", &hot, Some("alice"), Some("text/xml"), "<a/>")
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // None of the refused calls attached anything.
    let r = c.get(&format!("/api/disks/{d}"), "alice").await;
    assert_eq!(r.json()["users"], "0");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_pdisk_format() {
    let c = Client::new();
    for uri in ["/api", "/api/", "/api/disks/a/b", "/api/a/b/c"] {
        c.get(uri, "alice").await.error(
            StatusCode::NOT_FOUND,
            &["Unable to find requested resource."],
        );
    }
    c.form("/api/disks", "alice", "")
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED, &["Method not allowed"]);
    c.send("PUT", "/api/disks/x", Some("alice"), None, "")
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED, &["Method not allowed"]);
    c.get("/api/hotattach/x", "alice")
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED, &["Method not allowed"]);
    c.get("/api/create", "alice")
        .await
        .error(StatusCode::BAD_REQUEST, &["Method not allowed"]);
    // Paths outside /api keep the neutral 404.
    let r = c.get("/nope", "alice").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], 404);
}

#[tokio::test]
async fn daemon_failures_are_500_without_details() {
    let c = Client::new();
    c.fake.broken.store(true, Ordering::SeqCst);
    c.get("/api/disks", "alice").await.error(
        StatusCode::INTERNAL_SERVER_ERROR,
        &["Internal server error"],
    );
    c.form("/api/create", "alice", "size=1&tag=t&visibility=private")
        .await
        .error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &["Internal server error"],
        );
}

#[test]
fn openapi_documents_every_pdisk_route() {
    let doc = serde_json::to_value(crate::openapi()).expect("openapi json");
    let paths = &doc["paths"];
    for (path, methods) in [
        ("/api/disks", &["get"][..]),
        ("/api/disks/{uuid}", &["get", "delete"]),
        ("/api/create", &["get", "post"]),
        ("/api/{action}", &["post"]),
        ("/api/{action}/{uuid}", &["post"]),
    ] {
        for m in methods {
            assert!(paths[path][m].is_object(), "{m} {path} missing: {paths}");
        }
    }
}
