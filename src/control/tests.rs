//! The volume model's rules against a real store and catalog in a temp dir.

use std::sync::Arc;

use admin_api::model::*;

use super::{Settings, volumes::Volumes};
use crate::{
    catalog::Catalog,
    store::{Store, StoreOptions},
};

struct Env {
    _dir: tempfile::TempDir,
    store: Store,
    catalog: Catalog,
    volumes: Arc<Volumes>,
}

fn settings() -> Settings {
    Settings {
        public_url: "http://127.0.0.1:8776".into(),
        nbd_url: "nbd://127.0.0.1:10809".into(),
        token_ttl: std::time::Duration::from_secs(3600),
        image_size_cap: 1 << 40,
        multiattach_limit: 3,
        nbd_socket: "/nonexistent/nbd.sock".into(),
        convert_jobs: 1,
        show_image_direct_url: false,
        image_service_url: None,
        identity_url: None,
        tmp_dir: std::env::temp_dir(),
        message_ttl: std::time::Duration::from_secs(2_592_000),
    }
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store"), StoreOptions::default())
        .await
        .unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog.sqlite"))
        .await
        .unwrap();
    catalog
        .call(|conn| {
            conn.execute_batch(
                "INSERT INTO projects (id, name, created_at) VALUES
                   ('p1', 'one', '2026-01-01T00:00:00Z'), ('p2', 'two', '2026-01-01T00:00:00Z');
                 INSERT INTO users (id, name, created_at) VALUES
                   ('u1', 'alice', '2026-01-01T00:00:00Z'), ('u2', 'bob', '2026-01-01T00:00:00Z'),
                   ('u3', 'root', '2026-01-01T00:00:00Z');
                 -- root administers from p2 (the daemon always keeps an admin).
                 INSERT INTO roles (id, name) VALUES ('r-admin', 'admin');
                 INSERT INTO role_assignments (user_id, project_id, role_id)
                   VALUES ('u3', 'p2', 'r-admin');",
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let volumes = Arc::new(Volumes::new(catalog.clone(), store.clone(), settings()));
    Env {
        _dir: dir,
        store,
        catalog,
        volumes,
    }
}

fn caller(user: &str, project: &str, roles: &[Role]) -> Caller {
    Caller {
        user_id: user.into(),
        user_name: user.into(),
        project_id: project.into(),
        project_name: project.into(),
        roles: roles.to_vec(),
    }
}

fn alice() -> Caller {
    caller("u1", "p1", &[Role::Member])
}
fn bob() -> Caller {
    caller("u2", "p2", &[Role::Member])
}
fn admin() -> Caller {
    caller("u3", "p2", &[Role::Admin])
}

fn vol(size: u64) -> NewVolume {
    NewVolume {
        size_gib: size,
        name: Some("v".into()),
        ..NewVolume::default()
    }
}

#[tokio::test]
async fn create_is_thin_and_delete_frees() {
    let e = env().await;
    let v = e.volumes.create_volume(&alice(), vol(10)).await.unwrap();
    assert_eq!(v.status, VolumeStatus::Available);
    assert_eq!(v.size_gib, 10);
    assert_eq!(v.owner.as_deref(), Some("alice"));
    assert_eq!(v.user_limit, 1);
    let id: uuid::Uuid = v.id.parse().unwrap();
    let info = e.store.object_info(id).unwrap();
    assert_eq!(info.size, 10 << 30);
    assert_eq!(info.allocated_bytes, 0, "creating allocates nothing");
    e.volumes
        .delete_volume(&alice(), &v.id, false)
        .await
        .unwrap();
    assert!(e.store.object_info(id).is_err(), "store object deleted");
    let err = e
        .volumes
        .get_volume(&alice(), &v.id, false)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn bad_requests_change_nothing() {
    let e = env().await;
    let err = e.volumes.create_volume(&alice(), vol(0)).await.unwrap_err();
    assert!(matches!(err, ServiceError::BadRequest(_)), "{err:?}");
    let err = e
        .volumes
        .create_volume(&alice(), vol(u64::MAX))
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::BadRequest(_)), "{err:?}");
    // Addressable in bytes, but past the store's largest object: refused by the store,
    // and no volume is left behind (not even one in error).
    let err = e
        .volumes
        .create_volume(&alice(), vol((i64::MAX as u64) >> 30))
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::BadRequest(_)), "{err:?}");
    let reader = caller("u1", "p1", &[Role::Reader]);
    let err = e.volumes.create_volume(&reader, vol(1)).await.unwrap_err();
    assert!(matches!(err, ServiceError::Forbidden(_)), "{err:?}");
    assert!(
        e.volumes
            .list_volumes(&admin(), VolumeScope::AllProjects)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(e.store.stats().objects, 0);
    for bad in [
        "",
        "nope",
        "../../etc",
        "00000000-0000-0000-0000-000000000000",
    ] {
        let err = e
            .volumes
            .get_volume(&alice(), bad, false)
            .await
            .unwrap_err();
        assert!(matches!(err, ServiceError::NotFound(_)), "{bad}: {err:?}");
    }
}

#[tokio::test]
async fn projects_and_pdisk_visibility() {
    let e = env().await;
    let private = e.volumes.create_volume(&alice(), vol(1)).await.unwrap();
    let public = e
        .volumes
        .create_volume(
            &alice(),
            NewVolume {
                visibility: Some(Visibility::Public),
                ..vol(1)
            },
        )
        .await
        .unwrap();
    // Compute: another project sees nothing of p1, and a lookup says "not found".
    assert!(
        e.volumes
            .list_volumes(&bob(), VolumeScope::Project)
            .await
            .unwrap()
            .is_empty()
    );
    let err = e
        .volumes
        .get_volume(&bob(), &private.id, false)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound(_)));
    // pdisk: public disks are visible, private ones are refused for lack of rights.
    let seen = e
        .volumes
        .list_volumes(&bob(), VolumeScope::PdiskVisible)
        .await
        .unwrap();
    assert_eq!(
        seen.iter().map(|v| &v.id).collect::<Vec<_>>(),
        vec![&public.id]
    );
    let err = e
        .volumes
        .get_volume(&bob(), &private.id, true)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::Forbidden(_)));
    // Only the owner (or an admin) deletes a pdisk disk, public or not.
    let err = e
        .volumes
        .delete_volume(&bob(), &public.id, true)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::Forbidden(_)));
    assert_eq!(
        e.volumes
            .list_volumes(&admin(), VolumeScope::AllProjects)
            .await
            .unwrap()
            .len(),
        2
    );
    let err = e
        .volumes
        .list_volumes(&alice(), VolumeScope::AllProjects)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::Forbidden(_)));
    e.volumes
        .delete_volume(&admin(), &public.id, true)
        .await
        .unwrap();
}

#[tokio::test]
async fn attach_detach_follow_status_and_limits() {
    let e = env().await;
    let a = alice();
    let v = e.volumes.create_volume(&a, vol(1)).await.unwrap();
    let s1 = e
        .volumes
        .create_server(&a, NewServer::default())
        .await
        .unwrap();
    let s2 = e
        .volumes
        .create_server(&a, NewServer::default())
        .await
        .unwrap();
    let req = |server: &str| AttachRequest {
        volume_id: v.id.clone(),
        target: AttachTarget::Server(server.into()),
        device: None,
        kind: AttachKind::Hot,
        naming: DeviceNaming::DevPath,
    };
    let at = e.volumes.attach(&a, req(&s1.id)).await.unwrap();
    assert_eq!(at.device.as_deref(), Some("/dev/vdb"));
    assert_eq!(at.nbd_uri, format!("nbd://127.0.0.1:10809/{}", v.id));
    let got = e.volumes.get_volume(&a, &v.id, false).await.unwrap();
    assert_eq!(got.status, VolumeStatus::InUse);
    assert_eq!(got.users_remaining(), 0);
    // Not multi-attach: a second server is refused, and so is deleting it while in use.
    let err = e.volumes.attach(&a, req(&s2.id)).await.unwrap_err();
    assert!(matches!(err, ServiceError::Conflict(_)), "{err:?}");
    let err = e.volumes.delete_volume(&a, &v.id, false).await.unwrap_err();
    assert!(matches!(err, ServiceError::Conflict(_)), "{err:?}");
    // Unknown server / volume.
    let err = e.volumes.attach(&a, req("not-a-server")).await.unwrap_err();
    assert!(matches!(err, ServiceError::NotFound(_)));
    // Another project's server is invisible.
    let err = e
        .volumes
        .attach(&bob(), AttachRequest { ..req(&s1.id) })
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound(_)), "{err:?}");
    // Detach from the wrong server: 404; from the right one: available again.
    let err = e
        .volumes
        .detach(&a, AttachTarget::Server(s2.id.clone()), &v.id, false)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound(_)));
    e.volumes
        .detach(&a, AttachTarget::Server(s1.id.clone()), &v.id, false)
        .await
        .unwrap();
    let got = e.volumes.get_volume(&a, &v.id, false).await.unwrap();
    assert_eq!(got.status, VolumeStatus::Available);
    assert!(got.attachments.is_empty());
    // Deleting a server detaches its volumes.
    e.volumes.attach(&a, req(&s2.id)).await.unwrap();
    e.volumes.delete_server(&a, &s2.id).await.unwrap();
    let got = e.volumes.get_volume(&a, &v.id, false).await.unwrap();
    assert_eq!(got.status, VolumeStatus::Available);
    assert!(
        e.volumes
            .list_servers(&a)
            .await
            .unwrap()
            .iter()
            .all(|s| s.id != s2.id)
    );
}

#[tokio::test]
async fn pdisk_targets_and_vms() {
    let e = env().await;
    let a = alice();
    let mut ids = Vec::new();
    for _ in 0..27 {
        ids.push(e.volumes.create_volume(&a, vol(1)).await.unwrap().id);
    }
    let vm = || AttachTarget::Vm {
        node: "node-1".into(),
        vm_id: "722".into(),
    };
    for (i, id) in ids.iter().enumerate() {
        let r = e
            .volumes
            .attach(
                &a,
                AttachRequest {
                    volume_id: id.clone(),
                    target: vm(),
                    device: None,
                    kind: AttachKind::Hot,
                    naming: DeviceNaming::PdiskTarget,
                },
            )
            .await;
        if i < 26 {
            let at = r.unwrap();
            assert_eq!(
                at.device.unwrap(),
                format!("vd{}", (b'a' + i as u8) as char)
            );
            assert_eq!(at.node.as_deref(), Some("node-1"));
        } else {
            assert!(matches!(r.unwrap_err(), ServiceError::OverLimit(_)));
            let v = e.volumes.get_volume(&a, id, true).await.unwrap();
            assert_eq!(
                v.status,
                VolumeStatus::Available,
                "refused attach changed nothing"
            );
        }
    }
    // Static attach, then hot-only detach refuses it.
    let extra = e.volumes.create_volume(&a, vol(1)).await.unwrap();
    let other_vm = AttachTarget::Vm {
        node: "node-1".into(),
        vm_id: "723".into(),
    };
    let at = e
        .volumes
        .attach(
            &a,
            AttachRequest {
                volume_id: extra.id.clone(),
                target: other_vm.clone(),
                device: None,
                kind: AttachKind::Static,
                naming: DeviceNaming::PdiskTarget,
            },
        )
        .await
        .unwrap();
    assert_eq!(at.device, None);
    let err = e
        .volumes
        .detach(&a, other_vm.clone(), &extra.id, true)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::BadRequest(_)));
    let gone = e.volumes.detach_all(&a, vm()).await.unwrap();
    assert_eq!(gone.len(), 26);
    assert!(e.volumes.detach_all(&a, vm()).await.unwrap().is_empty());
    assert_eq!(
        e.volumes
            .list_attachments(&a, other_vm)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn racing_attaches_admit_exactly_the_limit() {
    let e = env().await;
    let a = alice();
    let single = e.volumes.create_volume(&a, vol(1)).await.unwrap();
    let multi = e
        .volumes
        .create_volume(
            &a,
            NewVolume {
                multiattach: true,
                ..vol(1)
            },
        )
        .await
        .unwrap();
    let mut servers = Vec::new();
    for _ in 0..8 {
        servers.push(
            e.volumes
                .create_server(&a, NewServer::default())
                .await
                .unwrap()
                .id,
        );
    }
    for (v, limit) in [(&single, 1usize), (&multi, 3)] {
        let mut tasks = Vec::new();
        for s in &servers {
            let (vols, a, vid, sid) = (e.volumes.clone(), a.clone(), v.id.clone(), s.clone());
            tasks.push(tokio::spawn(async move {
                vols.attach(
                    &a,
                    AttachRequest {
                        volume_id: vid,
                        target: AttachTarget::Server(sid),
                        device: None,
                        kind: AttachKind::Hot,
                        naming: DeviceNaming::DevPath,
                    },
                )
                .await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(ServiceError::Conflict(_)) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ok, limit);
        let got = e.volumes.get_volume(&a, &v.id, false).await.unwrap();
        assert_eq!(got.attachments.len(), limit);
    }
}

#[tokio::test]
async fn state_survives_reopen() {
    let e = env().await;
    let v = e.volumes.create_volume(&alice(), vol(2)).await.unwrap();
    let s = e
        .volumes
        .create_server(&alice(), NewServer::default())
        .await
        .unwrap();
    e.volumes
        .attach(
            &alice(),
            AttachRequest {
                volume_id: v.id.clone(),
                target: AttachTarget::Server(s.id.clone()),
                device: Some("/dev/vdq".into()),
                kind: AttachKind::Hot,
                naming: DeviceNaming::DevPath,
            },
        )
        .await
        .unwrap();
    let Env {
        _dir: dir,
        store,
        catalog,
        volumes,
    } = e;
    drop(volumes);
    store.close().await.unwrap();
    catalog.close().await.unwrap();
    let store = Store::open(&dir.path().join("store"), StoreOptions::default())
        .await
        .unwrap();
    let catalog = Catalog::open(&dir.path().join("catalog.sqlite"))
        .await
        .unwrap();
    let volumes = Volumes::new(catalog.clone(), store.clone(), settings());
    let got = volumes.get_volume(&alice(), &v.id, false).await.unwrap();
    assert_eq!(got.status, VolumeStatus::InUse);
    assert_eq!(got.attachments[0].device.as_deref(), Some("/dev/vdq"));
    assert_eq!(
        store.object_info(v.id.parse().unwrap()).unwrap().size,
        2 << 30
    );
}

/// Deleting a project that still owns a volume is a 409 Conflict (never a 500), changes
/// nothing, and works once the volume is gone. The project is some user's default project, so
/// the delete cascades first (SQLite then reports the RESTRICT as a trigger constraint).
#[tokio::test]
async fn deleting_a_project_that_owns_volumes_is_a_conflict() {
    let e = env().await;
    e.catalog
        .call(|conn| {
            conn.execute(
                "UPDATE users SET default_project_id = 'p1' WHERE id = 'u1'",
                [],
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let identity = super::identity::Identity::new(e.catalog.clone(), settings());
    let v = e.volumes.create_volume(&alice(), vol(1)).await.unwrap();
    let err = identity.delete_project(&admin(), "p1").await.unwrap_err();
    assert!(matches!(err, ServiceError::Conflict(_)), "{err:?}");
    // Nothing changed: the project, the user's default project and the volume are there.
    assert_eq!(identity.get_project(&admin(), "p1").await.unwrap().id, "p1");
    let u = identity.get_user(&admin(), "u1").await.unwrap();
    assert_eq!(u.default_project_id.as_deref(), Some("p1"));
    e.volumes.get_volume(&alice(), &v.id, false).await.unwrap();
    e.volumes
        .delete_volume(&alice(), &v.id, false)
        .await
        .unwrap();
    identity.delete_project(&admin(), "p1").await.unwrap();
}

/// A pdisk VM belongs to the project that registered it: a member of another project cannot
/// attach to it (even a public disk), detach from it, or list its disks; nothing changes.
#[tokio::test]
async fn pdisk_vms_of_another_project_are_off_limits() {
    let e = env().await;
    let private = e.volumes.create_volume(&alice(), vol(1)).await.unwrap();
    let public = e
        .volumes
        .create_volume(
            &bob(),
            NewVolume {
                visibility: Some(Visibility::Public),
                ..vol(1)
            },
        )
        .await
        .unwrap();
    let vm = || AttachTarget::Vm {
        node: "n1".into(),
        vm_id: "7".into(),
    };
    let req = |volume: &Volume| AttachRequest {
        volume_id: volume.id.clone(),
        target: vm(),
        device: None,
        kind: AttachKind::Hot,
        naming: DeviceNaming::PdiskTarget,
    };
    e.volumes.attach(&alice(), req(&private)).await.unwrap();

    let err = e.volumes.attach(&bob(), req(&public)).await.unwrap_err();
    assert!(matches!(err, ServiceError::Forbidden(_)), "{err:?}");
    let err = e.volumes.detach_all(&bob(), vm()).await.unwrap_err();
    assert!(matches!(err, ServiceError::Forbidden(_)), "{err:?}");
    let err = e.volumes.list_attachments(&bob(), vm()).await.unwrap_err();
    assert!(matches!(err, ServiceError::Forbidden(_)), "{err:?}");
    // bob's public disk attached to the VM by alice: bob still cannot detach it from her VM.
    e.volumes.attach(&alice(), req(&public)).await.unwrap();
    let err = e
        .volumes
        .detach(&bob(), vm(), &public.id, true)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::Forbidden(_)), "{err:?}");

    let on_vm = e.volumes.list_attachments(&alice(), vm()).await.unwrap();
    assert_eq!(on_vm.len(), 2, "{on_vm:?}");
    let got = e
        .volumes
        .get_volume(&alice(), &private.id, true)
        .await
        .unwrap();
    assert_eq!(got.status, VolumeStatus::InUse);
    // An admin (pdisk's service user) may act on any VM.
    assert_eq!(e.volumes.detach_all(&admin(), vm()).await.unwrap().len(), 2);
}

/// A detach whose transaction fails after the attachment row went (here the server's row
/// cannot be deleted: a trigger injects the failure) is rolled back, and the export is not
/// ended: the volume stays attached and in use, and its NBD connections stay open. Found by
/// review: the export was ended inside the transaction, before the commit.
#[tokio::test]
async fn a_rolled_back_detach_does_not_end_the_export() {
    let e = env().await;
    let a = alice();
    let v = e.volumes.create_volume(&a, vol(1)).await.unwrap();
    let s = e
        .volumes
        .create_server(&a, NewServer::default())
        .await
        .unwrap();
    e.volumes
        .attach(
            &a,
            AttachRequest {
                volume_id: v.id.clone(),
                target: AttachTarget::Server(s.id.clone()),
                device: None,
                kind: AttachKind::Hot,
                naming: DeviceNaming::DevPath,
            },
        )
        .await
        .unwrap();
    // An NBD connection serving the volume's export.
    let mut ticket = e.volumes.fence().join(&v.id);
    assert!(ticket.activate());
    e.catalog
        .call(|conn| {
            conn.execute_batch(
                "CREATE TRIGGER fail_server_delete BEFORE DELETE ON servers \
                 BEGIN SELECT RAISE(ABORT, 'injected'); END;",
            )?;
            Ok(())
        })
        .await
        .unwrap();
    assert!(e.volumes.delete_server(&a, &s.id).await.is_err());
    let got = e.volumes.get_volume(&a, &v.id, false).await.unwrap();
    assert_eq!(got.status, VolumeStatus::InUse);
    assert_eq!(got.attachments.len(), 1);
    assert!(!ticket.is_ended(), "rolled back, yet the export was ended");

    // Without the failure the same call ends it.
    e.catalog
        .call(|conn| {
            conn.execute_batch("DROP TRIGGER fail_server_delete")?;
            Ok(())
        })
        .await
        .unwrap();
    let deleting = {
        let volumes = &e.volumes;
        let (a, id) = (a.clone(), s.id.clone());
        async move { volumes.delete_server(&a, &id).await }
    };
    let (r, ()) = tokio::join!(deleting, async {
        ticket.ended().await;
        drop(ticket);
    });
    r.unwrap();
}

/// Block Storage's attach flow on a multi-attach volume, mixed with Compute's: reserve from
/// in-use, an os-attach beside a Compute attachment, the `ro`/`rw` access it reports, the
/// refusals (each changing nothing), and a Compute detach ending a begun detach.
#[tokio::test]
async fn the_cinder_attach_flow_shares_compute_attachments() {
    let e = env().await;
    let a = alice();
    let v = e
        .volumes
        .create_volume(
            &a,
            NewVolume {
                multiattach: true,
                ..vol(1)
            },
        )
        .await
        .unwrap();
    let server = || async { e.volumes.create_server(&a, NewServer::default()).await };
    let (s1, s2, s3) = (
        server().await.unwrap(),
        server().await.unwrap(),
        server().await.unwrap(),
    );
    let status = || async { e.volumes.get_volume(&a, &v.id, false).await.unwrap().status };
    let os_attach = |s: &str, dev: &str, read_only: bool| VolumeAttach {
        instance_uuid: Some(s.to_owned()),
        host_name: None,
        mountpoint: dev.to_owned(),
        read_only,
    };
    e.volumes
        .attach(
            &a,
            AttachRequest {
                volume_id: v.id.clone(),
                target: AttachTarget::Server(s1.id.clone()),
                device: None,
                kind: AttachKind::Hot,
                naming: DeviceNaming::DevPath,
            },
        )
        .await
        .unwrap();
    // A multi-attach volume is reserved from in-use, and unreserved back to it.
    for (step, want) in [
        (AttachStep::Reserve, VolumeStatus::Attaching),
        (AttachStep::Unreserve, VolumeStatus::InUse),
        (AttachStep::Reserve, VolumeStatus::Attaching),
    ] {
        e.volumes.attach_step(&a, &v.id, step).await.unwrap();
        assert_eq!(status().await, want, "{step:?}");
    }
    // Refusals: a reader, another project, an unknown server, a host alone, a taken device.
    let reader = caller("u1", "p1", &[Role::Reader]);
    let err = e
        .volumes
        .cinder_attach(&reader, &v.id, os_attach(&s2.id, "/dev/vdc", true))
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::Forbidden(_)), "{err:?}");
    let err = e
        .volumes
        .cinder_attach(&bob(), &v.id, os_attach(&s2.id, "/dev/vdc", true))
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound(_)), "{err:?}");
    let err = e
        .volumes
        .cinder_attach(
            &a,
            &v.id,
            os_attach(&uuid::Uuid::new_v4().to_string(), "/dev/vdc", true),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ServiceError::NotFound(m) if m.starts_with("Instance ")),
        "{err:?}"
    );
    let host = VolumeAttach {
        instance_uuid: None,
        host_name: Some("hv1".into()),
        ..os_attach("", "/dev/vdc", true)
    };
    let err = e.volumes.cinder_attach(&a, &v.id, host).await.unwrap_err();
    assert!(matches!(err, ServiceError::BadRequest(_)), "{err:?}");
    let other = e.volumes.create_volume(&a, vol(1)).await.unwrap();
    e.volumes
        .cinder_attach(&a, &other.id, os_attach(&s2.id, "vdc", false))
        .await
        .unwrap();
    let err = e
        .volumes
        .cinder_attach(&a, &v.id, os_attach(&s2.id, "/dev/vdc", true))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ServiceError::BadRequest(m) if m.contains("(/dev/vdc) is in use")),
        "{err:?}"
    );
    assert_eq!(status().await, VolumeStatus::Attaching);
    // The reserved volume takes a second, read-only attachment; the export still writes.
    let ro = e
        .volumes
        .cinder_attach(&a, &v.id, os_attach(&s2.id, "/dev/vdd", true))
        .await
        .unwrap();
    assert_eq!(ro.device.as_deref(), Some("/dev/vdd"));
    assert_eq!(status().await, VolumeStatus::InUse);
    let c = e.volumes.connection(&a, &v.id).await.unwrap();
    assert!(!c.read_only);
    assert_eq!(
        (c.host.as_str(), c.port, c.uri),
        (
            "127.0.0.1",
            10809,
            format!("nbd://127.0.0.1:10809/{}", v.id)
        )
    );
    // Detaching without an id needs one attachment; the Compute one goes through Compute,
    // from a begun detach, and then only `ro` is left: the export is read-only.
    let err = e.volumes.cinder_detach(&a, &v.id, None).await.unwrap_err();
    assert!(
        matches!(&err, ServiceError::BadRequest(m) if m.contains("More than one attachment")),
        "{err:?}"
    );
    e.volumes
        .attach_step(&a, &v.id, AttachStep::BeginDetaching)
        .await
        .unwrap();
    assert_eq!(status().await, VolumeStatus::Detaching);
    e.volumes
        .detach(&a, AttachTarget::Server(s1.id.clone()), &v.id, false)
        .await
        .unwrap();
    assert_eq!(status().await, VolumeStatus::InUse);
    assert!(e.volumes.connection(&a, &v.id).await.unwrap().read_only);
    // The same instance again is cinder's answer of the attachment it has; a third server
    // is within the limit (3).
    let again = e
        .volumes
        .cinder_attach(&a, &v.id, os_attach(&s2.id, "/dev/vde", true))
        .await
        .unwrap();
    assert_eq!(again.id, ro.id);
    e.volumes
        .cinder_attach(&a, &v.id, os_attach(&s3.id, "/dev/vdb", false))
        .await
        .unwrap();
    assert!(!e.volumes.connection(&a, &v.id).await.unwrap().read_only);
    // os-detach by id, the last one without: available, and the export is gone.
    e.volumes
        .cinder_detach(&a, &v.id, Some(ro.id.clone()))
        .await
        .unwrap();
    assert_eq!(status().await, VolumeStatus::InUse);
    let last = e.volumes.cinder_detach(&a, &v.id, None).await.unwrap();
    assert_eq!(last.map(|l| l.server_id), Some(s3.id.clone()));
    assert_eq!(status().await, VolumeStatus::Available);
    assert!(
        e.volumes
            .cinder_detach(&a, &v.id, None)
            .await
            .unwrap()
            .is_none()
    );
    let err = e
        .volumes
        .attach_step(&a, &v.id, AttachStep::BeginDetaching)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::BadRequest(_)), "{err:?}");
}

/// A failed upload leaves a message for the project that asked, naming the upload's request;
/// a project sees its own messages, an admin every project's; a reader may read but not
/// delete; messages survive a reopen and go once past `expires_at`.
#[tokio::test]
async fn upload_failures_are_user_messages_scoped_to_their_project() {
    let e = env().await;
    let v = e.volumes.create_volume(&alice(), vol(1)).await.unwrap();
    let (_, copy) = e
        .volumes
        .begin_upload(&alice(), &v.id, false, Some("req-upload-1"))
        .await
        .unwrap();
    let why = ServiceError::Internal("the store said no".into());
    e.volumes.record_upload_failure("p1", &v.id, &why).await;
    e.volumes.end_upload(&v.id, copy).await;

    let list = e.volumes.list_messages(&alice()).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let m = &list[0];
    assert_eq!(m.project_id, "p1");
    assert_eq!(m.request_id, "req-upload-1");
    assert_eq!(m.event_id, "VOLUME_VOLUME_003_004");
    assert_eq!(
        (m.action_id.as_deref(), m.detail_id.as_deref()),
        (Some("003"), Some("004"))
    );
    assert_eq!(
        (m.resource_type.as_deref(), m.resource_uuid.as_deref()),
        (Some("VOLUME"), Some(v.id.as_str()))
    );
    assert_eq!(m.message_level, "ERROR");
    assert_eq!(m.expires_at - m.created_at, time::Duration::days(30));
    // The underlying error is not in the message.
    assert!(!format!("{m:?}").contains("store said no"));

    // Another project neither lists nor finds it; an admin (of p2) does both.
    assert!(e.volumes.list_messages(&bob()).await.unwrap().is_empty());
    let err = e.volumes.get_message(&bob(), &m.id).await.unwrap_err();
    assert_eq!(
        err,
        ServiceError::NotFound(format!("Message {} could not be found.", m.id))
    );
    assert!(e.volumes.delete_message(&bob(), &m.id).await.is_err());
    assert_eq!(e.volumes.list_messages(&admin()).await.unwrap().len(), 1);
    assert_eq!(e.volumes.get_message(&admin(), &m.id).await.unwrap(), *m);
    let err = e
        .volumes
        .get_message(&alice(), "not-a-uuid")
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound(_)), "{err:?}");

    // A reader of p1 reads it, and may not delete it.
    let reader = caller("u1", "p1", &[Role::Reader]);
    assert_eq!(
        e.volumes.get_message(&reader, &m.id).await.unwrap().id,
        m.id
    );
    let err = e.volumes.delete_message(&reader, &m.id).await.unwrap_err();
    assert_eq!(
        err,
        ServiceError::Forbidden("Policy doesn't allow message:delete to be performed.".into())
    );

    // The upload's request id went with the upload: a later failure without one gets its own.
    e.volumes.record_upload_failure("p1", &v.id, &why).await;
    let list = e.volumes.list_messages(&alice()).await.unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[0].created_at >= list[1].created_at, "newest first");
    assert!(list[0].request_id.starts_with("req-") && list[0].request_id != "req-upload-1");

    // Once past expires_at (as if the TTL were over), messages are gone at the next read.
    let expired = list[0].id.clone();
    e.catalog
        .call(move |conn| {
            conn.execute(
                "UPDATE messages SET expires_at = '2000-01-01T00:00:00.000000Z' WHERE id = ?1",
                [&expired],
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let left = e.volumes.list_messages(&admin()).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, m.id);
    let err = e
        .volumes
        .get_message(&alice(), &list[0].id)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound(_)), "{err:?}");

    e.volumes.delete_message(&alice(), &m.id).await.unwrap();
    assert!(e.volumes.list_messages(&admin()).await.unwrap().is_empty());
    let err = e.volumes.delete_message(&alice(), &m.id).await.unwrap_err();
    assert!(matches!(err, ServiceError::NotFound(_)), "{err:?}");
}

/// Shared filesystems (seed 002): who may make and change them, names and sizes, 409 for a
/// name taken another way, resize by the same `PUT`, and instances that follow the scope as
/// servers come and go.
#[tokio::test]
async fn filesystems_follow_scope_and_instances() {
    use crate::control::filesystems::Filesystems;
    use admin_api::filesystem::{FsRequest, FsScope};
    let en = env().await;
    let fs = Filesystems::new(en.catalog.clone());
    let req = |size: &str, scope, project: Option<&str>| FsRequest {
        size_text: size.into(),
        scope,
        project: project.map(str::to_owned),
    };
    fn err<T>(r: ServiceResult<T>) -> ServiceError {
        r.map(|_| ()).unwrap_err()
    }
    // Refusals, each changing nothing.
    for (who, name, r) in [
        (alice(), "g", req("4Gb", FsScope::Global, None)),
        (alice(), "other", req("4Gb", FsScope::Project, Some("p2"))),
    ] {
        let e = err(fs.put(&who, name, r).await);
        assert!(matches!(e, ServiceError::Forbidden(_)), "{e:?}");
    }
    for (name, size) in [("a/b", "4Gb"), ("ok", "4Pb"), ("ok", "0Gb")] {
        let e = err(fs
            .put(&alice(), name, req(size, FsScope::Instance, None))
            .await);
        assert!(matches!(e, ServiceError::BadRequest(_)), "{e:?}");
    }
    let reader = caller("u9", "p1", &[Role::Reader]);
    let e = err(fs
        .put(&reader, "r", req("1Gb", FsScope::Instance, None))
        .await);
    assert!(matches!(e, ServiceError::Forbidden(_)), "{e:?}");
    assert!(fs.list(&admin()).await.unwrap().is_empty());

    let (home, made) = fs
        .put(&alice(), "home", req("4Gb", FsScope::Project, None))
        .await
        .unwrap();
    assert!(made);
    assert_eq!(
        (home.size_bytes, home.project_id.as_deref()),
        (4 << 30, Some("p1"))
    );
    let (scratch, _) = fs
        .put(&alice(), "scratch", req("1Gb", FsScope::Instance, None))
        .await
        .unwrap();
    assert_eq!(scratch.project_id.as_deref(), Some("p1"));
    fs.put(&admin(), "data", req("80Gb", FsScope::Global, None))
        .await
        .unwrap();
    // The same PUT resizes; the name taken with another scope is 409.
    let (grown, made) = fs
        .put(&alice(), "home", req("8Gb", FsScope::Project, None))
        .await
        .unwrap();
    assert!(!made);
    assert_eq!(
        (grown.size_bytes, grown.size_text.as_str()),
        (8 << 30, "8Gb")
    );
    let e = err(fs
        .put(&alice(), "home", req("8Gb", FsScope::Instance, None))
        .await);
    assert!(matches!(e, ServiceError::Conflict(_)), "{e:?}");
    let e = err(fs
        .put(&bob(), "home", req("8Gb", FsScope::Project, None))
        .await);
    assert!(matches!(e, ServiceError::Conflict(_)), "{e:?}");

    // Visibility: bob sees the global one only, and cannot touch alice's.
    let names = |v: Vec<admin_api::filesystem::Filesystem>| {
        v.into_iter().map(|f| f.name).collect::<Vec<_>>()
    };
    assert_eq!(names(fs.list(&bob()).await.unwrap()), ["data"]);
    assert_eq!(
        names(fs.list(&alice()).await.unwrap()),
        ["data", "home", "scratch"]
    );
    let e = err(fs.delete(&bob(), "home").await);
    assert!(matches!(e, ServiceError::NotFound(_)), "{e:?}");
    let e = err(fs.delete(&alice(), "data").await);
    assert!(matches!(e, ServiceError::Forbidden(_)), "{e:?}");

    // Instances follow the scope, servers made later included.
    let s1 = en
        .volumes
        .create_server(&alice(), NewServer::default())
        .await
        .unwrap();
    let s2 = en
        .volumes
        .create_server(&bob(), NewServer::default())
        .await
        .unwrap();
    assert_eq!(
        fs.instances(&alice(), "home").await.unwrap(),
        std::slice::from_ref(&s1.id)
    );
    let mut all = vec![s1.id.clone(), s2.id.clone()];
    all.sort();
    assert_eq!(fs.instances(&alice(), "data").await.unwrap(), all);
    assert!(fs.instances(&alice(), "scratch").await.unwrap().is_empty());
    let e = err(fs.connect(&alice(), "scratch", &s2.id).await);
    assert!(
        matches!(e, ServiceError::NotFound(_)),
        "another project's instance: {e:?}"
    );
    let e = err(fs.connect(&alice(), "home", &s1.id).await);
    assert!(matches!(e, ServiceError::BadRequest(_)), "{e:?}");
    fs.connect(&alice(), "scratch", &s1.id).await.unwrap();
    fs.connect(&alice(), "scratch", &s1.id).await.unwrap();
    assert_eq!(
        fs.instances(&alice(), "scratch").await.unwrap(),
        std::slice::from_ref(&s1.id)
    );
    let s3 = en
        .volumes
        .create_server(&alice(), NewServer::default())
        .await
        .unwrap();
    let mut home_now = vec![s1.id.clone(), s3.id.clone()];
    home_now.sort();
    assert_eq!(fs.instances(&alice(), "home").await.unwrap(), home_now);
    // A deleted instance is gone from every list at once.
    en.volumes.delete_server(&alice(), &s1.id).await.unwrap();
    assert!(fs.instances(&alice(), "scratch").await.unwrap().is_empty());
    assert_eq!(
        fs.instances(&alice(), "home").await.unwrap(),
        std::slice::from_ref(&s3.id)
    );
    let e2 = err(fs.disconnect(&alice(), "scratch", &s3.id).await);
    assert!(matches!(e2, ServiceError::NotFound(_)), "{e2:?}");
    fs.delete(&alice(), "scratch").await.unwrap();
    assert_eq!(names(fs.list(&alice()).await.unwrap()), ["data", "home"]);
}
