//! Router tests for the Compute family against an in-memory fake service: shapes, status
//! codes and the fault of every error path. The daemon itself is driven by
//! `tests/api_compute.rs`.

use std::{collections::BTreeMap, sync::Arc, sync::Mutex};

use axum::{
    body::Body,
    http::{HeaderMap, Request, StatusCode},
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use time::macros::datetime;
use tower::ServiceExt;

use crate::{AdminService, Health, StoreMetrics, VersionInfo, model::*, router};

const VOL_ID: &str = "0b0e5d4a-5a9e-4c44-9d4f-7f1b2a4f6a10";
const SRV_ID: &str = "3912f2b4-c5ba-4aec-9165-872876fe202e";

#[derive(Default)]
struct Fake {
    volumes: Mutex<Vec<Volume>>,
    servers: Mutex<Vec<Server>>,
    /// Every NewVolume the fake was asked to create.
    created: Mutex<Vec<NewVolume>>,
    scopes: Mutex<Vec<VolumeScope>>,
}

fn caller(project: &str, role: Role) -> Caller {
    Caller {
        user_id: format!("u-{}", role.as_str()),
        user_name: role.as_str().into(),
        project_id: project.into(),
        project_name: project.into(),
        roles: vec![role],
    }
}

fn volume(id: &str, project: &str) -> Volume {
    Volume {
        id: id.into(),
        project_id: project.into(),
        user_id: Some("u-member".into()),
        owner: Some("member".into()),
        name: Some("vol".into()),
        description: None,
        size_gib: 3,
        status: VolumeStatus::Available,
        volume_type: None,
        availability_zone: "nova".into(),
        snapshot_id: None,
        source_volume_id: None,
        source_image_id: None,
        bootable: false,
        multiattach: false,
        visibility: Visibility::Private,
        tag: None,
        metadata: BTreeMap::new(),
        created_at: datetime!(2026-11-23 18:00:01.250000 UTC),
        updated_at: datetime!(2026-11-23 18:00:01.250000 UTC),
        attachments: vec![],
        user_limit: 1,
        readonly: false,
        image_metadata: None,
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
            store_format_version: 0,
            catalog_schema_version: 0,
        }
    }
    fn store_metrics(&self) -> StoreMetrics {
        StoreMetrics::default()
    }
    async fn validate_token(&self, token: &str) -> ServiceResult<TokenInfo> {
        let c = match token {
            "admin" => caller("p1", Role::Admin),
            "member" => caller("p1", Role::Member),
            "reader" => caller("p1", Role::Reader),
            "other" => caller("p2", Role::Member),
            _ => {
                return Err(ServiceError::Unauthorized(
                    "The request you have made requires authentication.".into(),
                ));
            }
        };
        Ok(TokenInfo {
            caller: c,
            role_ids: vec![],
            methods: vec!["password".into()],
            audit_id: "a".into(),
            issued_at: datetime!(2026-11-23 18:00 UTC),
            expires_at: datetime!(2026-11-23 19:00 UTC),
        })
    }
    async fn create_volume(&self, caller: &Caller, new: NewVolume) -> ServiceResult<Volume> {
        if let Some(s) = &new.snapshot_id {
            // The fake keeps no snapshots.
            return Err(ServiceError::NotFound(format!(
                "Snapshot {s} could not be found."
            )));
        }
        let mut v = volume(VOL_ID, &caller.project_id);
        v.size_gib = new.size_gib;
        v.name = new.name.clone();
        v.description = new.description.clone();
        v.metadata = new.metadata.clone();
        self.created.lock().unwrap().push(new);
        self.volumes.lock().unwrap().push(v.clone());
        Ok(v)
    }
    async fn list_volumes(
        &self,
        caller: &Caller,
        scope: VolumeScope,
    ) -> ServiceResult<Vec<Volume>> {
        self.scopes.lock().unwrap().push(scope);
        Ok(self
            .volumes
            .lock()
            .unwrap()
            .iter()
            .filter(|v| scope == VolumeScope::AllProjects || v.project_id == caller.project_id)
            .cloned()
            .collect())
    }
    async fn get_volume(&self, caller: &Caller, id: &str, _: bool) -> ServiceResult<Volume> {
        if id == "boom" {
            return Err(ServiceError::Internal(
                "disk on fire at /secret/path".into(),
            ));
        }
        self.volumes
            .lock()
            .unwrap()
            .iter()
            .find(|v| v.id == id && v.project_id == caller.project_id)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(format!("Volume {id} could not be found.")))
    }
    async fn delete_volume(&self, caller: &Caller, id: &str, p: bool) -> ServiceResult<()> {
        let v = self.get_volume(caller, id, p).await?;
        if !v.attachments.is_empty() {
            return Err(ServiceError::Conflict(format!("Volume {id} is attached.")));
        }
        self.volumes.lock().unwrap().retain(|v| v.id != id);
        Ok(())
    }
    async fn create_server(&self, caller: &Caller, new: NewServer) -> ServiceResult<Server> {
        let s = Server {
            id: SRV_ID.into(),
            project_id: caller.project_id.clone(),
            user_id: Some(caller.user_id.clone()),
            name: new.name,
            node: None,
            vm_id: None,
            status: "ACTIVE".into(),
            metadata: new.metadata,
            created_at: datetime!(2026-11-23 18:00:02.5 UTC),
        };
        self.servers.lock().unwrap().push(s.clone());
        Ok(s)
    }
    async fn list_servers(&self, caller: &Caller) -> ServiceResult<Vec<Server>> {
        Ok(self
            .servers
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.project_id == caller.project_id)
            .cloned()
            .collect())
    }
    async fn get_server(&self, caller: &Caller, id: &str) -> ServiceResult<Server> {
        self.list_servers(caller)
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| ServiceError::NotFound(format!("Instance {id} could not be found.")))
    }
    async fn delete_server(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        self.get_server(caller, id).await?;
        self.servers.lock().unwrap().retain(|s| s.id != id);
        for v in self.volumes.lock().unwrap().iter_mut() {
            v.attachments.retain(|a| a.server_id != id);
        }
        Ok(())
    }
    async fn attach(&self, caller: &Caller, req: AttachRequest) -> ServiceResult<Attachment> {
        let AttachTarget::Server(server) = req.target else {
            return Err(ServiceError::BadRequest("not a server".into()));
        };
        assert_eq!(req.naming, DeviceNaming::DevPath);
        assert_eq!(req.kind, AttachKind::Hot);
        self.get_server(caller, &server).await?;
        self.get_volume(caller, &req.volume_id, false).await?;
        let mut vols = self.volumes.lock().unwrap();
        let v = vols.iter_mut().find(|v| v.id == req.volume_id).unwrap();
        if !v.attachments.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "Volume {} is in use.",
                v.id
            )));
        }
        let a = Attachment {
            id: "att-1".into(),
            volume_id: v.id.clone(),
            server_id: server,
            device: Some(req.device.unwrap_or_else(|| "/dev/vdb".into())),
            kind: req.kind,
            attached_at: datetime!(2026-11-23 18:00:03 UTC),
            node: None,
            vm_id: None,
            nbd_uri: format!("nbd://127.0.0.1:10809/{}", v.id),
        };
        v.attachments.push(a.clone());
        v.status = VolumeStatus::InUse;
        Ok(a)
    }
    async fn detach(
        &self,
        caller: &Caller,
        target: AttachTarget,
        volume_id: &str,
        _: bool,
    ) -> ServiceResult<Attachment> {
        let list = self.list_attachments(caller, target).await?;
        let a = list
            .into_iter()
            .find(|a| a.volume_id == volume_id)
            .ok_or_else(|| {
                ServiceError::NotFound(format!("Volume {volume_id} is not attached."))
            })?;
        for v in self.volumes.lock().unwrap().iter_mut() {
            v.attachments.retain(|x| x.volume_id != volume_id);
            if v.id == volume_id {
                v.status = VolumeStatus::Available;
            }
        }
        Ok(a)
    }
    async fn list_attachments(
        &self,
        caller: &Caller,
        target: AttachTarget,
    ) -> ServiceResult<Vec<Attachment>> {
        let AttachTarget::Server(server) = target else {
            return Err(ServiceError::BadRequest("not a server".into()));
        };
        self.get_server(caller, &server).await?;
        Ok(self
            .volumes
            .lock()
            .unwrap()
            .iter()
            .flat_map(|v| v.attachments.clone())
            .filter(|a| a.server_id == server)
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
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    /// Asserts a Compute fault of this status and name; returns its message.
    fn fault(&self, status: u16, name: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        let v = self.json();
        let obj = v.as_object().expect("object");
        assert_eq!(obj.len(), 1, "{v}");
        assert_eq!(v[name]["code"], status, "{v}");
        assert_eq!(v[name].as_object().map(|o| o.len()), Some(2), "{v}");
        v[name]["message"].as_str().expect("message").to_owned()
    }
}

async fn req(
    app: &axum::Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Resp {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "cairn.test:8776");
    if let Some(t) = token {
        b = b.header("x-auth-token", t);
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let r = b
        .body(
            body.map(|s| Body::from(s.to_owned()))
                .unwrap_or_else(Body::empty),
        )
        .expect("request");
    let resp = app.clone().oneshot(r).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Resp {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).expect("utf8"),
    }
}

fn app() -> (Arc<Fake>, axum::Router) {
    let fake = Arc::new(Fake::default());
    (fake.clone(), router(fake))
}

#[tokio::test]
async fn extensions_are_the_2011_descriptor_byte_for_byte() {
    let (_, app) = app();
    for prefix in ["/v1.1", "/v2", "/v2.1"] {
        let r = req(
            &app,
            "GET",
            &format!("{prefix}/p1/extensions"),
            Some("reader"),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.body,
            r#"{"extensions": [{"updated": "2011-03-25T00:00:00+00:00", "name": "Volumes", "links": [], "namespace": "http://docs.openstack.org/ext/volumes/api/v1.1", "alias": "os-volumes", "description": "Volumes support"}, {"updated": "2012-04-11T00:00:00+00:00", "name": "Shared_fs", "links": [], "namespace": "http://docs.openstack.org/ext/shared_filesystem/api/v1.1", "alias": "os-shared-filesystem", "description": "Shared filesystem support"}]}"#
        );
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(
            r.headers["x-openstack-request-id"]
                .to_str()
                .unwrap()
                .starts_with("req-")
        );
        assert_eq!(
            r.headers["x-openstack-request-id"],
            r.headers["x-compute-request-id"]
        );
        let r = req(
            &app,
            "GET",
            &format!("{prefix}/p1/extensions/os-volumes"),
            Some("reader"),
            None,
        )
        .await;
        assert_eq!(
            r.body,
            r#"{"extension": {"updated": "2011-03-25T00:00:00+00:00", "name": "Volumes", "links": [], "namespace": "http://docs.openstack.org/ext/volumes/api/v1.1", "alias": "os-volumes", "description": "Volumes support"}}"#
        );
        let r = req(
            &app,
            "GET",
            &format!("{prefix}/p1/extensions/os-nope"),
            Some("reader"),
            None,
        )
        .await;
        assert_eq!(
            r.fault(404, "itemNotFound"),
            "Extension os-nope could not be found."
        );
    }
}

#[tokio::test]
async fn auth_and_tenant_errors() {
    let (fake, app) = app();
    let r = req(&app, "GET", "/v1.1/p1/os-volumes", None, None).await;
    assert_eq!(
        r.fault(401, "unauthorized"),
        "The request you have made requires authentication."
    );
    // Absolute, as identity's own 401s (the Fake's public URL is the default).
    assert_eq!(
        r.headers["www-authenticate"],
        "Keystone uri=\"http://localhost\""
    );
    let r = req(&app, "GET", "/v1.1/p1/os-volumes", Some("bogus"), None).await;
    r.fault(401, "unauthorized");
    // another project's token on this tenant's URL
    let r = req(
        &app,
        "POST",
        "/v2.1/p1/os-volumes",
        Some("other"),
        Some(r#"{"volume":{"size":1}}"#),
    )
    .await;
    assert_eq!(
        r.fault(400, "badRequest"),
        "Malformed request URL: URL's project_id 'p1' doesn't match Context's project_id 'p2'"
    );
    assert!(fake.created.lock().unwrap().is_empty());
    // reader may read, not write
    let r = req(&app, "GET", "/v1.1/p1/os-volumes", Some("reader"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    for (m, path, body) in [
        (
            "POST",
            "/v1.1/p1/os-volumes",
            Some(r#"{"volume":{"size":1}}"#),
        ),
        ("DELETE", "/v1.1/p1/os-volumes/x", None),
        (
            "POST",
            "/v1.1/p1/servers",
            Some(r#"{"server":{"name":"a"}}"#),
        ),
        ("DELETE", "/v1.1/p1/servers/x", None),
        (
            "POST",
            "/v1.1/p1/servers/x/os-volume_attachments",
            Some(r#"{"volumeAttachment":{"volumeId":"x"}}"#),
        ),
        ("DELETE", "/v1.1/p1/servers/x/os-volume_attachments/y", None),
    ] {
        let r = req(&app, m, path, Some("reader"), body).await;
        r.fault(403, "forbidden");
    }
    assert!(fake.created.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unknown_paths_and_methods_are_faults() {
    let (_, app) = app();
    for path in [
        "/v1.1/p1/nothing",
        "/v2.1/p1/os-volumes/x/y",
        "/v2/p1/servers/x/nope",
        "/v1.1/x",
        "/v1.1",
        "/v1.1/",
        "/v1.1/p1/",
        "/v2.1/p1/",
    ] {
        let r = req(&app, "GET", path, Some("member"), None).await;
        r.fault(404, "itemNotFound");
    }
    let r = req(&app, "PATCH", "/v1.1/p1/os-volumes", Some("member"), None).await;
    r.fault(405, "badMethod");
    let r = req(
        &app,
        "POST",
        "/v2.1/p1/os-volumes/detail",
        Some("member"),
        None,
    )
    .await;
    r.fault(405, "badMethod");
    // A path that is not UTF-8 once decoded: a clear 400, not axum's plain text.
    let r = req(&app, "GET", "/v1.1/%FF/os-volumes", Some("member"), None).await;
    r.fault(400, "badRequest");
}

#[tokio::test]
async fn volume_crud_shapes() {
    let (fake, app) = app();
    let r = req(
        &app,
        "POST",
        "/v2.1/p1/os-volumes",
        Some("member"),
        Some(r#"{"volume": {"size": "2", "display_name": "n", "display_description": "d", "availability_zone": "nova", "metadata": {"k": "v"}}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.headers["location"],
        format!("http://cairn.test:8776/v2.1/p1/os-volumes/{VOL_ID}")
    );
    assert_eq!(
        r.json(),
        json!({"volume": {
            "id": VOL_ID, "status": "available", "size": 2, "availabilityZone": "nova",
            "createdAt": "2026-11-23T18:00:01.250000", "attachments": [{}],
            "displayName": "n", "displayDescription": "d", "volumeType": null,
            "snapshotId": null, "metadata": {"k": "v"}}})
    );
    {
        let created = fake.created.lock().unwrap();
        assert_eq!(created[0].size_gib, 2);
        assert_eq!(created[0].availability_zone.as_deref(), Some("nova"));
    }
    let show = req(
        &app,
        "GET",
        &format!("/v1.1/p1/os-volumes/{VOL_ID}"),
        Some("reader"),
        None,
    )
    .await;
    assert_eq!(show.json(), r.json());
    for path in ["/v1.1/p1/os-volumes", "/v1.1/p1/os-volumes/detail"] {
        let list = req(&app, "GET", path, Some("reader"), None).await;
        assert_eq!(list.json(), json!({"volumes": [r.json()["volume"]]}));
    }
    let r = req(
        &app,
        "GET",
        "/v1.1/p1/os-volumes?offset=1",
        Some("reader"),
        None,
    )
    .await;
    assert_eq!(r.json(), json!({"volumes": []}));
    let r = req(
        &app,
        "GET",
        "/v1.1/p1/os-volumes?limit=x",
        Some("reader"),
        None,
    )
    .await;
    assert_eq!(r.fault(400, "badRequest"), "limit param must be an integer");
    let r = req(
        &app,
        "GET",
        "/v1.1/p1/os-volumes?offset=-1",
        Some("reader"),
        None,
    )
    .await;
    assert_eq!(r.fault(400, "badRequest"), "offset param must be positive");
    // all_tenants only for admins
    req(
        &app,
        "GET",
        "/v1.1/p1/os-volumes?all_tenants=1",
        Some("member"),
        None,
    )
    .await;
    req(
        &app,
        "GET",
        "/v1.1/p1/os-volumes?all_tenants=1",
        Some("admin"),
        None,
    )
    .await;
    let scopes = fake.scopes.lock().unwrap().clone();
    assert_eq!(
        &scopes[scopes.len() - 2..],
        &[VolumeScope::Project, VolumeScope::AllProjects]
    );

    let r = req(
        &app,
        "DELETE",
        &format!("/v1.1/p1/os-volumes/{VOL_ID}"),
        Some("member"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.body, "");
    let r = req(
        &app,
        "GET",
        &format!("/v1.1/p1/os-volumes/{VOL_ID}"),
        Some("member"),
        None,
    )
    .await;
    assert_eq!(
        r.fault(404, "itemNotFound"),
        format!("Volume {VOL_ID} could not be found.")
    );
    let r = req(
        &app,
        "DELETE",
        &format!("/v1.1/p1/os-volumes/{VOL_ID}"),
        Some("member"),
        None,
    )
    .await;
    r.fault(404, "itemNotFound");
}

#[tokio::test]
async fn internal_errors_are_generic_compute_faults() {
    let (_, app) = app();
    let r = req(
        &app,
        "GET",
        "/v1.1/p1/os-volumes/boom",
        Some("member"),
        None,
    )
    .await;
    let m = r.fault(500, "computeFault");
    assert!(!m.contains("secret"), "{m}");
}

#[tokio::test]
async fn create_volume_validation() {
    let (fake, app) = app();
    let cases: &[(&str, &str)] = &[
        ("", "badRequest"),
        ("not json", "badRequest"),
        ("[1]", "badRequest"),
        ("{}", "badRequest"),
        (r#"{"volume": 1}"#, "badRequest"),
        (r#"{"volume": {}}"#, "badRequest"),
        (r#"{"volume": {"size": 0}}"#, "badRequest"),
        (r#"{"volume": {"size": -1}}"#, "badRequest"),
        (r#"{"volume": {"size": 1.5}}"#, "badRequest"),
        (r#"{"volume": {"size": "1x"}}"#, "badRequest"),
        (r#"{"volume": {"size": ""}}"#, "badRequest"),
        (r#"{"volume": {"size": true}}"#, "badRequest"),
        (
            r#"{"volume": {"size": 99999999999999999999999}}"#,
            "badRequest",
        ),
        (
            r#"{"volume": {"size": "99999999999999999999999"}}"#,
            "badRequest",
        ),
        (r#"{"volume": {"size": 9007199254740993}}"#, "badRequest"),
        (r#"{"volume": {"size": 1, "bogus": 1}}"#, "badRequest"),
        (r#"{"volume": {"size": 1}, "extra": 1}"#, "badRequest"),
        (r#"{"volume": {"size": 1, "metadata": []}}"#, "badRequest"),
        (
            r#"{"volume": {"size": 1, "metadata": {"a": 1}}}"#,
            "badRequest",
        ),
        (
            r#"{"volume": {"size": 1, "display_name": 5}}"#,
            "badRequest",
        ),
        (
            r#"{"volume": {"size": 1, "display_name": false}}"#,
            "badRequest",
        ),
        (
            r#"{"volume": {"size": 1, "snapshot_id": "s"}}"#,
            "itemNotFound",
        ),
    ];
    for (body, name) in cases {
        let r = req(
            &app,
            "POST",
            "/v1.1/p1/os-volumes",
            Some("member"),
            Some(body),
        )
        .await;
        let code = if *name == "itemNotFound" { 404 } else { 400 };
        r.fault(code, name);
    }
    // wrong content type
    let r = app
        .clone()
        .oneshot(
            Request::builder()
                .method("POST")
                .uri("/v1.1/p1/os-volumes")
                .header("x-auth-token", "member")
                .header("content-type", "text/plain")
                .body(Body::from(r#"{"volume": {"size": 1}}"#))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp_fault(resp_to(r).await, 415), "badMediaType");
    assert!(fake.created.lock().unwrap().is_empty());
}

async fn resp_to(r: axum::response::Response) -> Resp {
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

fn resp_fault(r: Resp, code: u16) -> String {
    assert_eq!(r.status.as_u16(), code, "{}", r.body);
    let v = r.json();
    let (name, inner) = v.as_object().unwrap().iter().next().unwrap();
    assert_eq!(inner["code"], code);
    name.clone()
}

#[tokio::test]
async fn servers_and_attachments() {
    let (_, app) = app();
    let r = req(
        &app,
        "POST",
        "/v2.1/p1/servers",
        Some("member"),
        Some(r#"{"server": {"name": "vm1", "imageRef": "x", "flavorRef": "1", "metadata": {"a": "b"}}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let self_href = format!("http://cairn.test:8776/v2.1/p1/servers/{SRV_ID}");
    assert_eq!(
        r.json(),
        json!({"server": {"id": SRV_ID, "links": [
            {"rel": "self", "href": self_href},
            {"rel": "bookmark", "href": format!("http://cairn.test:8776/p1/servers/{SRV_ID}")}],
            "OS-DCF:diskConfig": "MANUAL", "security_groups": [{"name": "default"}]}})
    );
    for body in [
        r#"{"server": {}}"#,
        r#"{"server": {"name": ""}}"#,
        r#"{"server": {"name": "a", "bogus": 1}}"#,
        r#"{"server": {"name": "a", "metadata": {"k": 1}}}"#,
        r#"{"servers": {"name": "a"}}"#,
    ] {
        req(&app, "POST", "/v2.1/p1/servers", Some("member"), Some(body))
            .await
            .fault(400, "badRequest");
    }
    let list = req(&app, "GET", "/v2.1/p1/servers", Some("reader"), None).await;
    assert_eq!(list.json()["servers"][0]["name"], "vm1");
    let detail = req(&app, "GET", "/v2.1/p1/servers/detail", Some("reader"), None).await;
    let s = &detail.json()["servers"][0];
    assert_eq!(s["status"], "ACTIVE");
    assert_eq!(s["tenant_id"], "p1");
    assert_eq!(s["metadata"], json!({"a": "b"}));
    assert_eq!(s["created"], "2026-11-23T18:00:02Z");
    let show = req(
        &app,
        "GET",
        &format!("/v2.1/p1/servers/{SRV_ID}"),
        Some("reader"),
        None,
    )
    .await;
    assert_eq!(&show.json()["server"], s);
    req(&app, "GET", "/v2.1/p1/servers/nope", Some("reader"), None)
        .await
        .fault(404, "itemNotFound");

    // volume to attach
    req(
        &app,
        "POST",
        "/v2.1/p1/os-volumes",
        Some("member"),
        Some(r#"{"volume": {"size": 1}}"#),
    )
    .await;
    let att = format!("/v2.1/p1/servers/{SRV_ID}/os-volume_attachments");
    for body in [
        r#"{"volumeAttachment": {}}"#,
        r#"{"volumeAttachment": {"volumeId": "not-a-uuid"}}"#,
        r#"{"volumeAttachment": {"volumeId": "0b0e5d4a-5a9e-4c44-9d4f-7f1b2a4f6a10", "device": "sdb"}}"#,
        r#"{"volumeAttachment": {"volumeId": "0b0e5d4a-5a9e-4c44-9d4f-7f1b2a4f6a10", "x": 1}}"#,
    ] {
        req(&app, "POST", &att, Some("member"), Some(body))
            .await
            .fault(400, "badRequest");
    }
    let r = req(
        &app,
        "POST",
        "/v2.1/p1/servers/nope/os-volume_attachments",
        Some("member"),
        Some(&format!(
            r#"{{"volumeAttachment": {{"volumeId": "{VOL_ID}"}}}}"#
        )),
    )
    .await;
    r.fault(404, "itemNotFound");
    let r = req(
        &app,
        "POST",
        &att,
        Some("member"),
        Some(r#"{"volumeAttachment": {"volumeId": "11111111-2222-3333-4444-555555555555"}}"#),
    )
    .await;
    r.fault(404, "itemNotFound");
    let body =
        format!(r#"{{"volumeAttachment": {{"volumeId": "{VOL_ID}", "device": "/dev/vdc"}}}}"#);
    let r = req(&app, "POST", &att, Some("member"), Some(&body)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let view = json!({"id": VOL_ID, "serverId": SRV_ID, "volumeId": VOL_ID, "device": "/dev/vdc",
        "nbdUri": format!("nbd://127.0.0.1:10809/{VOL_ID}")});
    assert_eq!(r.json(), json!({"volumeAttachment": view}));
    req(&app, "POST", &att, Some("member"), Some(&body))
        .await
        .fault(409, "conflictingRequest");
    let r = req(&app, "GET", &att, Some("reader"), None).await;
    assert_eq!(r.json(), json!({"volumeAttachments": [view]}));
    let r = req(
        &app,
        "GET",
        &format!("{att}/{VOL_ID}"),
        Some("reader"),
        None,
    )
    .await;
    assert_eq!(r.json(), json!({"volumeAttachment": view}));
    req(
        &app,
        "GET",
        &format!("{att}/11111111-2222-3333-4444-555555555555"),
        Some("reader"),
        None,
    )
    .await
    .fault(404, "itemNotFound");
    req(
        &app,
        "PUT",
        &format!("{att}/{VOL_ID}"),
        Some("member"),
        Some("{}"),
    )
    .await
    .fault(400, "badRequest");
    // the server and volume views show the attachment
    let srv = req(
        &app,
        "GET",
        &format!("/v2.1/p1/servers/{SRV_ID}"),
        Some("reader"),
        None,
    )
    .await;
    assert_eq!(
        srv.json()["server"]["os-extended-volumes:volumes_attached"],
        json!([{"id": VOL_ID}])
    );
    let v = req(
        &app,
        "GET",
        &format!("/v2.1/p1/os-volumes/{VOL_ID}"),
        Some("reader"),
        None,
    )
    .await;
    assert_eq!(v.json()["volume"]["status"], "in-use");
    assert_eq!(
        v.json()["volume"]["attachments"],
        json!([{"id": VOL_ID, "volumeId": VOL_ID, "serverId": SRV_ID, "device": "/dev/vdc"}])
    );
    // in use: delete refused with 400 as nova relays cinder's InvalidVolume
    req(
        &app,
        "DELETE",
        &format!("/v2.1/p1/os-volumes/{VOL_ID}"),
        Some("member"),
        None,
    )
    .await
    .fault(400, "badRequest");
    let r = req(
        &app,
        "DELETE",
        &format!("{att}/{VOL_ID}"),
        Some("member"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.body, "");
    req(
        &app,
        "DELETE",
        &format!("{att}/{VOL_ID}"),
        Some("member"),
        None,
    )
    .await
    .fault(404, "itemNotFound");
    let r = req(
        &app,
        "DELETE",
        &format!("/v2.1/p1/servers/{SRV_ID}"),
        Some("member"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    req(&app, "GET", &att, Some("member"), None)
        .await
        .fault(404, "itemNotFound");
}

#[tokio::test]
async fn version_discovery_and_microversions() {
    let (_, app) = app();
    for path in ["/v2.1", "/v2.1/", "/v2.1/p1"] {
        let r = req(&app, "GET", path, None, None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        let v = r.json();
        assert_eq!(v["version"]["id"], "v2.1");
        assert_eq!(v["version"]["version"], "2.35");
        assert_eq!(v["version"]["min_version"], "2.1");
        assert_eq!(v["version"]["status"], "CURRENT");
    }
    let get = |h: (&'static str, &'static str)| {
        let app = app.clone();
        async move {
            let r = app
                .oneshot(
                    Request::builder()
                        .uri("/v2.1/p1/os-volumes")
                        .header("x-auth-token", "member")
                        .header(h.0, h.1)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            resp_to(r).await
        }
    };
    let r = get(("x-openstack-nova-api-version", "2.35")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-openstack-nova-api-version"], "2.35");
    assert_eq!(r.headers["openstack-api-version"], "compute 2.35");
    let r = get(("openstack-api-version", "compute latest")).await;
    assert_eq!(r.headers["openstack-api-version"], "compute 2.35");
    let r = get(("x-openstack-nova-api-version", "2.36")).await;
    assert_eq!(resp_fault(r, 406), "computeFault");
    let r = get(("x-openstack-nova-api-version", "two")).await;
    assert_eq!(resp_fault(r, 400), "badRequest");
    // legacy prefixes ignore microversions
    let r = app
        .clone()
        .oneshot(
            Request::builder()
                .uri("/v1.1/p1/os-volumes")
                .header("x-auth-token", "member")
                .header("x-openstack-nova-api-version", "2.99")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[test]
fn openapi_lists_every_prefix() {
    let doc = crate::openapi();
    for prefix in ["/v1.1", "/v2", "/v2.1"] {
        let p = format!(
            "{prefix}/{{tenant_id}}/servers/{{server_id}}/os-volume_attachments/{{volume_id}}"
        );
        let item = doc
            .paths
            .paths
            .get(&p)
            .unwrap_or_else(|| panic!("{p} missing"));
        assert!(item.put.is_some() && item.get.is_some() && item.delete.is_some());
    }
    assert!(doc.paths.paths.contains_key("/v2.1"));
}

#[tokio::test]
async fn oversized_body_is_an_overlimit_fault() {
    let (fake, app) = app();
    let big = format!(
        r#"{{"volume": {{"size": 1, "display_name": "{}"}}}}"#,
        "x".repeat(3 << 20)
    );
    let r = req(
        &app,
        "POST",
        "/v1.1/p1/os-volumes",
        Some("member"),
        Some(&big),
    )
    .await;
    r.fault(413, "overLimit");
    assert!(fake.created.lock().unwrap().is_empty());
}

/// Identity shares the router: a body over the limit is a 413 in Keystone's error format
/// (axum's own rejection is plain text). In process, so the answer cannot race the upload.
#[tokio::test]
async fn identity_oversized_body_is_a_keystone_413() {
    let (_, app) = app();
    let big = " ".repeat(3 << 20);
    let r = req(&app, "POST", "/v3/auth/tokens", None, Some(&big)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).expect("JSON body");
    assert_eq!(v["error"]["code"], 413, "{}", r.body);
    assert_eq!(v["error"]["title"], "Payload Too Large", "{}", r.body);
}

/// The request schemas of `/openapi.json` name exactly the keys the nova-style validators
/// accept, so that the document cannot drift from them.
#[test]
fn documented_request_bodies_are_what_the_validators_accept() {
    use std::collections::BTreeSet;
    let doc = serde_json::to_value(crate::openapi()).expect("openapi json");
    let props = |name: &str| -> BTreeSet<String> {
        doc["components"]["schemas"][name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name}"))
            .keys()
            .cloned()
            .collect()
    };
    let set = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(props("VolumeCreate"), set(&super::volumes::VOLUME_KEYS));
    let mut server = set(&super::servers::IGNORED_SERVER_KEYS);
    server.extend(["name".to_string(), "metadata".to_string()]);
    assert_eq!(props("ServerCreate"), server);
    assert_eq!(props("AttachBody"), set(&["volumeId", "device"]));
}
