//! Images on the real daemon with real clients: the `openstack` CLI, python-glanceclient and
//! openstacksdk against the Image API v2 (uploads, imports, downloads compared byte for byte,
//! the StarlingX properties and their messages, members); the raw cache with images made by
//! `qemu-img` (qcow2 sparse and compressed, vmdk streamOptimized, vdi, vhdx, vhd), read back over NBD
//! with `qemu-img compare`; volumes made from images; hostile images refused; a restart in
//! the middle of a conversion.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{Cairn, Out, Serve, admin_token, clean, metric, os_client, osc, run, venv_bin};
use serde_json::{Value, json};

const PW: &str = "image-test-admin-pw";
/// The longest a conversion of the test images may take (debug build, busy machine).
const CONVERT_DEADLINE: Duration = Duration::from_secs(120);

fn daemon() -> Cairn {
    Serve::new().arg("--admin-password").arg(PW).start()
}

/// The `glance` CLI, authenticated by the usual environment variables, stdin closed.
fn glance(c: &Cairn, args: &[&str]) -> Out {
    run(os_client(c, "glance", PW)
        .env("OS_IMAGE_API_VERSION", "2")
        .args(args))
}

/// An admin token and its project id.
fn token(c: &Cairn) -> (String, String) {
    admin_token(c, PW)
}

fn image_json(c: &Cairn, tok: &str, id: &str) -> Value {
    let r = c.request(
        "GET",
        &format!("/image/v2/images/{id}"),
        &[("x-auth-token", tok)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Waits (bounded) until the image's raw cache is no longer queued or converting.
fn wait_cache(c: &Cairn, tok: &str, id: &str) -> Value {
    let deadline = Instant::now() + CONVERT_DEADLINE;
    loop {
        let i = image_json(c, tok, id);
        match i["cache_raw_status"].as_str() {
            Some("Cached" | "Error") => return i,
            _ if Instant::now() > deadline => {
                panic!(
                    "cache still {i} after {CONVERT_DEADLINE:?}\n{}",
                    c.logs.text()
                )
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Waits (bounded) until the volume is no longer being made.
fn wait_volume(c: &Cairn, tok: &str, tenant: &str, id: &str) -> Value {
    let deadline = Instant::now() + CONVERT_DEADLINE;
    loop {
        let r = c.request(
            "GET",
            &format!("/v1.1/{tenant}/os-volumes/{id}"),
            &[("x-auth-token", tok)],
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json()["volume"].clone();
        match v["status"].as_str() {
            Some("creating" | "downloading") if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            _ => return v,
        }
    }
}

fn sh(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(o.ok, "{cmd:?} failed:\n{}\n{}", o.stdout, o.stderr);
    o.stdout
}

/// A 64 MiB sparse raw disk with 40 scattered 64 KiB runs of pseudo-random data, and the
/// same disk as qcow2 (64 KiB clusters, 4 KiB clusters, version 2, and 2 MiB clusters, which
/// go to qemu-img instead of the in-process reader), compressed qcow2, streamOptimized vmdk,
/// vdi, vhdx and vhd.
struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn new() -> Images {
        let dir = common::temp_dir();
        let base = dir.path().join("base.raw");
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(64 << 20).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        use std::os::unix::fs::FileExt;
        for _ in 0..40 {
            let off = (next() % ((64 << 20) - (64 << 10))) & !4095;
            let data: Vec<u8> = (0..(64 << 10)).map(|_| next() as u8).collect();
            f.write_all_at(&data, off).unwrap();
        }
        drop(f);
        let imgs = Images { dir };
        for (name, args) in [
            ("img.qcow2", &["-O", "qcow2"][..]),
            ("imgc.qcow2", &["-c", "-O", "qcow2"][..]),
            (
                "img4k.qcow2",
                &["-O", "qcow2", "-o", "cluster_size=4096"][..],
            ),
            ("imgv2.qcow2", &["-O", "qcow2", "-o", "compat=0.10"][..]),
            ("img2m.qcow2", &["-O", "qcow2", "-o", "cluster_size=2M"][..]),
            (
                "img.vmdk",
                &["-O", "vmdk", "-o", "subformat=streamOptimized"][..],
            ),
            ("img.vdi", &["-O", "vdi"][..]),
            ("img.vhdx", &["-O", "vhdx"][..]),
            // force_size: the disk's exact size, not one rounded to a CHS geometry.
            (
                "img.vhd",
                &["-O", "vpc", "-o", "force_size=on,subformat=dynamic"][..],
            ),
        ] {
            sh(Command::new("qemu-img")
                .arg("convert")
                .args(["-f", "raw"])
                .args(args)
                .arg(&base)
                .arg(imgs.path(name)));
        }
        imgs
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn base(&self) -> PathBuf {
        self.path("base.raw")
    }
}

fn hex_digest<D: sha2::Digest>(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    D::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn md5_hex(path: &Path) -> String {
    let out = sh(Command::new("md5sum").arg(path));
    out.split_whitespace().next().unwrap().to_owned()
}

/// `qemu-img compare` of a raw file with an NBD export (a larger export must read zeros
/// past the file's end: qemu-img checks that too).
fn compare(file: &Path, uri: &str) {
    let o = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(file)
        .arg(uri));
    assert!(
        o.ok && o.stdout.contains("Images are identical"),
        "{uri} differs from {}:\n{}\n{}",
        file.display(),
        o.stdout,
        o.stderr
    );
}

fn unix_uri(c: &Cairn, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        c.data_dir().join("nbd.sock").display()
    )
}

/// `POST /v2/images` of a queued image; its id.
fn create_queued(c: &Cairn, tok: &str, name: &str, disk_format: &str) -> String {
    let r = c.request(
        "POST",
        "/image/v2/images",
        &[("x-auth-token", tok)],
        Some((
            "application/json",
            &json!({"name": name, "disk_format": disk_format, "container_format": "bare"})
                .to_string(),
        )),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_owned()
}

/// `PUT .../file` of `file` with curl (no client cleans up after a failure); the status.
fn curl_upload(c: &Cairn, tok: &str, id: &str, file: &Path, extra: &[&str]) -> String {
    let o = run(Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-T",
        ])
        .arg(file)
        .args(["-H", "content-type: application/octet-stream", "-H"])
        .arg(format!("x-auth-token: {tok}"))
        .args(extra)
        .arg(c.url(&format!("/image/v2/images/{id}/file"))));
    // Not `o.ok`: a server that refuses a body early may leave curl unable to send the rest;
    // the status it received is what counts ("000" if none).
    o.stdout
}

#[test]
fn openstack_cli_uploads_imports_downloads_and_validates_starlingx_properties() {
    let c = daemon();
    let imgs = Images::new();
    let file = imgs.path("img.qcow2");
    let i = osc(
        &c,
        &[
            "image",
            "create",
            "--disk-format",
            "qcow2",
            "--container-format",
            "bare",
            "--file",
            file.to_str().unwrap(),
            "--property",
            "sw_wrs_auto_recovery=true",
            "--property",
            "hw_wrs_live_migration_timeout=300",
            "--min-disk",
            "1",
            "-f",
            "json",
            "cli-image",
        ],
    )
    .json();
    let id = i["id"].as_str().unwrap().to_owned();
    assert_eq!(i["status"], "active", "{i}");
    assert_eq!(i["checksum"], md5_hex(&file), "{i}");
    // The CLI shows the fields it does not know among the properties.
    let field = |k: &str| {
        i.get(k)
            .filter(|v| !v.is_null())
            .unwrap_or(&i["properties"][k])
            .clone()
    };
    assert_eq!(field("os_hash_algo"), "sha512", "{i}");
    assert_eq!(
        field("os_hash_value"),
        hex_digest::<sha2::Sha512>(&file),
        "{i}"
    );
    assert_eq!(i["size"], std::fs::metadata(&file).unwrap().len(), "{i}");
    assert_eq!(i["virtual_size"], 64 << 20, "{i}");
    // Normalised as stx-glance does.
    assert_eq!(i["properties"]["sw_wrs_auto_recovery"], "True", "{i}");
    assert_eq!(i["properties"]["store"], "cairn", "{i}");

    // Every StarlingX rule, with stx-glance's message, on create and on set.
    let (tok, _) = token(&c);
    for (prop, msg) in [
        (
            "hw_wrs_live_migration_timeout=100",
            "hw_wrs_live_migration_timeout must be a number between 120 and 800 or 0, value: 100",
        ),
        (
            "hw_wrs_live_migration_timeout=801",
            "hw_wrs_live_migration_timeout must be a number between 120 and 800 or 0, value: 801",
        ),
        (
            "hw_wrs_live_migration_timeout=abc",
            "hw_wrs_live_migration_timeout must be a number between 120 and 800 or 0, value: abc",
        ),
        (
            "hw_wrs_live_migration_max_downtime=99",
            "hw_wrs_live_migration_max_downtime must be a number greater than or equal to 100, value: 99",
        ),
        (
            "hw_wrs_live_migration_max_downtime=x",
            "hw_wrs_live_migration_max_downtime must be a number greater than or equal to 100, value: x",
        ),
        (
            "sw_wrs_auto_recovery=maybe",
            "sw_wrs_auto_recovery must be True or False, value: maybe",
        ),
    ] {
        // openstacksdk sends PATCH with an empty Accept, which webob answers in text/plain,
        // a body the SDK does not show: the CLI says only "Bad Request", as with Glance.
        let set = osc(&c, &["image", "set", "--property", prop, &id]);
        assert!(!set.ok, "{prop} was taken");
        assert!(set.stderr.contains("400"), "{prop}: {}", set.stderr);
        let (key, value) = prop.split_once('=').unwrap();
        let patch = c.request(
            "PATCH",
            &format!("/image/v2/images/{id}"),
            &[("x-auth-token", &tok), ("accept", "application/json")],
            Some((
                "application/openstack-images-v2.1-json-patch",
                &json!([{"op": "add", "path": format!("/{key}"), "value": value}]).to_string(),
            )),
        );
        assert_eq!(patch.status, 400, "{}", patch.body);
        // webob's JSON error body: the message, then its HTML line breaks.
        let m = patch.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(m.starts_with(&format!("{msg}<br />")), "{}", patch.body);
        let create = osc(
            &c,
            &[
                "image",
                "create",
                "--property",
                prop,
                "-f",
                "json",
                "refused",
            ],
        );
        assert!(!create.ok, "{prop} was taken on create");
        assert!(create.stderr.contains(msg), "{prop}: {}", create.stderr);
    }
    // Refused changes changed nothing; good values are taken (0 and the range ends).
    let shown = osc(&c, &["image", "show", "-f", "json", &id]).json();
    assert_eq!(shown["properties"]["hw_wrs_live_migration_timeout"], "300");
    for good in [
        "hw_wrs_live_migration_timeout=0",
        "hw_wrs_live_migration_timeout=120",
        "hw_wrs_live_migration_timeout=800",
        "hw_wrs_live_migration_max_downtime=100",
        "sw_wrs_auto_recovery=FALSE",
    ] {
        let set = osc(&c, &["image", "set", "--property", good, &id]);
        assert!(set.ok, "{good}: {}", set.stderr);
    }
    let shown = osc(&c, &["image", "show", "-f", "json", &id]).json();
    assert_eq!(
        shown["properties"]["sw_wrs_auto_recovery"], "False",
        "{shown}"
    );
    assert_eq!(shown["properties"]["hw_wrs_live_migration_timeout"], "800");
    let unset = osc(
        &c,
        &[
            "image",
            "unset",
            "--property",
            "hw_wrs_live_migration_timeout",
            &id,
        ],
    );
    assert!(unset.ok, "{}", unset.stderr);
    let shown = osc(&c, &["image", "show", "-f", "json", &id]).json();
    assert!(
        shown["properties"]
            .get("hw_wrs_live_migration_timeout")
            .is_none()
    );
    // Read-only StarlingX keys are refused.
    let ro = osc(
        &c,
        &["image", "set", "--property", "cache_raw_status=Cached", &id],
    );
    assert!(!ro.ok, "cache_raw_status was writable");

    // Download byte for byte.
    let saved = imgs.path("saved.qcow2");
    let save = osc(
        &c,
        &["image", "save", "--file", saved.to_str().unwrap(), &id],
    );
    assert!(save.ok, "{}", save.stderr);
    assert_eq!(
        std::fs::read(&saved).unwrap(),
        std::fs::read(&file).unwrap()
    );

    // glance-direct import.
    let vdi = imgs.path("img.vdi");
    let imported = osc(
        &c,
        &[
            "image",
            "create",
            "--import",
            "--disk-format",
            "vdi",
            "--container-format",
            "bare",
            "--file",
            vdi.to_str().unwrap(),
            "-f",
            "json",
            "imported",
        ],
    )
    .json();
    let imported_id = imported["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + CONVERT_DEADLINE;
    let active = loop {
        let i = image_json(&c, &tok, &imported_id);
        if i["status"] == "active" || Instant::now() > deadline {
            break i;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(active["status"], "active", "{active}");
    assert_eq!(active["checksum"], md5_hex(&vdi));

    let list = osc(&c, &["image", "list", "-f", "json"]).json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["Name"].as_str())
        .collect();
    assert!(
        names.contains(&"cli-image") && names.contains(&"imported"),
        "{list}"
    );
    assert!(!names.contains(&"refused"), "{list}");

    // Protected images stay; deleting frees the data.
    assert!(osc(&c, &["image", "set", "--protected", &id]).ok);
    let del = osc(&c, &["image", "delete", &id]);
    assert!(!del.ok, "a protected image was deleted");
    assert!(osc(&c, &["image", "set", "--unprotected", &id]).ok);
    let objects = metric(&c, "cairn_store_objects");
    let del = osc(&c, &["image", "delete", &id, &imported_id]);
    assert!(del.ok, "{}", del.stderr);
    assert_eq!(metric(&c, "cairn_store_objects"), objects - 2.0);
    assert!(!osc(&c, &["image", "show", &id]).ok);
}

#[test]
fn glanceclient_and_openstacksdk_round_trip_data_and_members() {
    let c = daemon();
    let imgs = Images::new();
    let file = imgs.path("img.vmdk");
    let created = glance(
        &c,
        &[
            "--os-image-api-version",
            "2",
            "image-create",
            "--name",
            "g1",
            "--disk-format",
            "vmdk",
            "--container-format",
            "bare",
            "--property",
            "sw_wrs_auto_recovery=False",
        ],
    );
    assert!(created.ok, "{}\n{}", created.stdout, created.stderr);
    let id = created
        .stdout
        .lines()
        .find(|l| l.starts_with("| id "))
        .and_then(|l| l.split('|').nth(2))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("{}", created.stdout));
    let up = glance(&c, &["image-upload", "--file", file.to_str().unwrap(), &id]);
    assert!(up.ok, "{}", up.stderr);
    let out = imgs.path("down.vmdk");
    let down = glance(
        &c,
        &["image-download", "--file", out.to_str().unwrap(), &id],
    );
    assert!(down.ok, "{}", down.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&file).unwrap());
    let upd = glance(
        &c,
        &[
            "image-update",
            "--property",
            "sw_wrs_auto_recovery=TRUE",
            &id,
        ],
    );
    assert!(upd.ok, "{}", upd.stderr);
    assert!(
        upd.stdout.contains("| sw_wrs_auto_recovery | True"),
        "{}",
        upd.stdout
    );
    let bad = glance(
        &c,
        &[
            "image-update",
            "--property",
            "hw_wrs_live_migration_max_downtime=1",
            &id,
        ],
    );
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains(
            "hw_wrs_live_migration_max_downtime must be a number greater than or equal to 100, value: 1"
        ),
        "{}",
        bad.stderr
    );

    // Members: share with another project, which accepts.
    let (tok, _) = token(&c);
    let p = c.request(
        "POST",
        "/v3/projects",
        &[("x-auth-token", &tok)],
        Some(("application/json", r#"{"project": {"name": "other"}}"#)),
    );
    assert_eq!(p.status, 201, "{}", p.body);
    let other = p.json()["project"]["id"].as_str().unwrap().to_owned();
    assert!(glance(&c, &["image-update", "--visibility", "shared", &id]).ok);
    let m = glance(&c, &["member-create", &id, &other]);
    assert!(m.ok, "{}", m.stderr);
    assert!(m.stdout.contains("pending"), "{}", m.stdout);
    let l = glance(&c, &["member-list", "--image-id", &id]);
    assert!(
        l.ok && l.stdout.contains(&other),
        "{}{}",
        l.stdout,
        l.stderr
    );
    let u = glance(&c, &["member-update", &id, &other, "accepted"]);
    assert!(
        u.ok && u.stdout.contains("accepted"),
        "{}{}",
        u.stdout,
        u.stderr
    );
    let d = glance(&c, &["member-delete", &id, &other]);
    assert!(d.ok, "{}", d.stderr);
    let l = glance(&c, &["member-list", "--image-id", &id]);
    assert!(l.ok && !l.stdout.contains(&other), "{}", l.stdout);

    // openstacksdk: upload, checksum, download.
    let script = r#"
import hashlib, sys, openstack
conn = openstack.connect(cloud="cairn")
data = open(sys.argv[1], "rb").read()
img = conn.image.create_image(name="sdk", data=data, disk_format="qcow2",
                              container_format="bare", validate_checksum=True)
img = conn.image.get_image(img.id)
assert img.status == "active", img.status
assert img.checksum == hashlib.md5(data).hexdigest(), img.checksum
got = conn.image.download_image(img)
got = getattr(got, "content", got)
assert got == data, "download differs"
assert img.id in [i.id for i in conn.image.images()]
conn.image.delete_image(img)
print("sdk ok")
"#;
    let o = run(clean(venv_bin("python"))
        .env("OS_CLIENT_CONFIG_FILE", c.data_dir().join("clouds.yaml"))
        .arg("-c")
        .arg(script)
        .arg(imgs.path("img.qcow2")));
    assert!(
        o.ok && o.stdout.contains("sdk ok"),
        "{}\n{}",
        o.stdout,
        o.stderr
    );
}

/// Uploads `file` as `disk_format` (container `container`), with `cache_raw` "True";
/// returns the image id.
fn upload(c: &Cairn, file: &Path, disk_format: &str, container: &str, name: &str) -> String {
    let i = osc(
        c,
        &[
            "image",
            "create",
            "--disk-format",
            disk_format,
            "--container-format",
            container,
            "--file",
            file.to_str().unwrap(),
            "--property",
            "cache_raw=True",
            "-f",
            "json",
            name,
        ],
    )
    .json();
    i["id"].as_str().unwrap().to_owned()
}

fn create_volume(c: &Cairn, tok: &str, tenant: &str, body: Value) -> (u16, Value) {
    let r = c.request(
        "POST",
        &format!("/v1.1/{tenant}/os-volumes"),
        &[("x-auth-token", tok)],
        Some(("application/json", &body.to_string())),
    );
    (r.status, r.json())
}

/// A new server with `volume` attached; the attachment's NBD URI.
fn attach(c: &Cairn, tok: &str, tenant: &str, volume: &str) -> String {
    let sid = common::server(c, tok, tenant);
    common::attach(c, tok, tenant, &sid, volume)
}

#[test]
fn raw_cache_round_trips_every_format_and_volumes_clone_it() {
    let c = daemon();
    let (tok, tenant) = token(&c);
    let imgs = Images::new();
    let base = imgs.base();
    let mut ids = Vec::new();
    for (file, fmt) in [
        ("img.qcow2", "qcow2"),
        ("imgc.qcow2", "qcow2"),
        ("img4k.qcow2", "qcow2"),
        ("imgv2.qcow2", "qcow2"),
        ("img2m.qcow2", "qcow2"),
        ("img.vmdk", "vmdk"),
        ("img.vdi", "vdi"),
        ("img.vhdx", "vhdx"),
        ("img.vhd", "vhd"),
    ] {
        let id = upload(&c, &imgs.path(file), fmt, "bare", file);
        let i = wait_cache(&c, &tok, &id);
        assert_eq!(i["cache_raw_status"], "Cached", "{file}: {i}");
        assert!(i.get("direct_url").is_none(), "shown without the flag: {i}");
        let url = i["cache_raw_url"].as_str().unwrap_or_default();
        assert!(
            url.starts_with("nbd://") && url.ends_with(&format!("/image/{id}")),
            "{i}"
        );
        // Holes stay holes: the cache holds the image's non-zero blocks, nothing more.
        assert_eq!(
            i["cache_raw_size"],
            nonzero_bytes(&base).to_string(),
            "{file}: {i}"
        );
        compare(&base, &unix_uri(&c, &format!("image/{id}")));
        ids.push(id);
    }
    // qcow2 with clusters of 4 to 64 KiB was read in-process; 2 MiB clusters and the other
    // formats went to qemu-img.
    assert_eq!(metric(&c, "cairn_image_conversions_in_process_total"), 4.0);
    // The exports are listed, read-only.
    let list = sh(Command::new("nbdinfo")
        .arg("--list")
        .arg(unix_uri(&c, "").replace(":///?", "://?")));
    for id in &ids {
        assert!(list.contains(&format!("image/{id}")), "{list}");
    }
    let w = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(unix_uri(&c, &format!("image/{}", ids[0]))));
    assert!(
        !w.ok || w.stderr.contains("ermission") || w.stdout.contains("ermission"),
        "{}{}",
        w.stdout,
        w.stderr
    );

    // A volume from a cached image is a clone: available at once, reads the image, and its
    // writes stay its own.
    let objects = metric(&c, "cairn_store_objects");
    let (st, v) = create_volume(
        &c,
        &tok,
        &tenant,
        json!({"volume": {"size": 2, "imageRef": ids[0]}}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["volume"]["status"], "available", "{v}");
    let vid = v["volume"]["id"].as_str().unwrap().to_owned();
    let uri = attach(&c, &tok, &tenant, &vid);
    compare(&base, &uri);
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 1M"])
        .arg(&uri));
    compare(&base, &unix_uri(&c, &format!("image/{}", ids[0])));
    assert_eq!(metric(&c, "cairn_store_objects"), objects + 1.0);

    // Too small for the image, or for min_disk: refused, nothing made.
    let (st, e) = create_volume(
        &c,
        &tok,
        &tenant,
        json!({"volume": {"size": 1, "imageRef": "not-an-image"}}),
    );
    assert_eq!(st, 404, "{e}");
    let set = osc(&c, &["image", "set", "--min-disk", "3", &ids[1]]);
    assert!(set.ok, "{}", set.stderr);
    let (st, e) = create_volume(
        &c,
        &tok,
        &tenant,
        json!({"volume": {"size": 2, "imageRef": ids[1]}}),
    );
    assert_eq!(st, 400, "{e}");
    assert!(
        e["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot be smaller than the image minDisk size 3GB"),
        "{e}"
    );
    assert_eq!(metric(&c, "cairn_store_objects"), objects + 1.0);

    // Without a cache the volume is converted while `downloading`.
    let plain = osc(
        &c,
        &[
            "image",
            "create",
            "--disk-format",
            "qcow2",
            "--container-format",
            "bare",
            "--file",
            imgs.path("imgc.qcow2").to_str().unwrap(),
            "-f",
            "json",
            "plain",
        ],
    )
    .json();
    let pid = plain["id"].as_str().unwrap();
    let (st, v) = create_volume(
        &c,
        &tok,
        &tenant,
        json!({"volume": {"size": 1, "imageRef": pid}}),
    );
    assert_eq!(st, 200, "{v}");
    let vid = v["volume"]["id"].as_str().unwrap().to_owned();
    let v = wait_volume(&c, &tok, &tenant, &vid);
    assert_eq!(v["status"], "available", "{v}");
    compare(&base, &attach(&c, &tok, &tenant, &vid));

    // Asking for the cache later (StarlingX: `cache_raw` set by PATCH) starts it.
    assert!(image_json(&c, &tok, pid).get("cache_raw_status").is_none());
    let set = osc(&c, &["image", "set", "--property", "cache_raw=True", pid]);
    assert!(set.ok, "{}", set.stderr);
    assert_eq!(wait_cache(&c, &tok, pid)["cache_raw_status"], "Cached");
    compare(&base, &unix_uri(&c, &format!("image/{pid}")));

    // Ten caches and one volume converted (six of them qcow2 in-process), none failed, none
    // running.
    assert_eq!(metric(&c, "cairn_image_conversions_completed_total"), 11.0);
    assert_eq!(metric(&c, "cairn_image_conversions_in_process_total"), 6.0);
    assert_eq!(metric(&c, "cairn_image_conversions_failed_total"), 0.0);
    assert_eq!(metric(&c, "cairn_image_conversions_running"), 0.0);

    // The client's `--image` takes a name.
    let o = run(Command::new(common::cairn_bin())
        .args([
            "volume",
            "create",
            "--size",
            "1",
            "--image",
            "img.vdi",
            "--json",
            "--data-dir",
        ])
        .arg(c.data_dir()));
    assert!(o.ok, "{}", o.stderr);
}

/// Bytes of the 4 KiB blocks of `file` that are not all zeros.
fn nonzero_bytes(file: &Path) -> u64 {
    let data = std::fs::read(file).unwrap();
    data.chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
        * 4096
}

/// A qemu-img that logs each call's subcommand to `log`, then runs the real one (fault
/// injection's cousin: it observes, it changes nothing).
fn logging_qemu_img(dir: &Path, log: &Path) -> PathBuf {
    let wrapper = dir.join("qemu-img-logged");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$1\" >> '{}'\nexec qemu-img \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

fn calls(log: &Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |s| s.lines().count())
}

#[test]
fn hostile_images_are_refused_and_read_nothing() {
    let dir = common::temp_dir();
    let p = |n: &str| dir.path().join(n);
    let log = p("qemu-img.log");
    let c = Serve::new()
        .arg("--admin-password")
        .arg(PW)
        .env("CAIRN_QEMU_IMG", logging_qemu_img(dir.path(), &log))
        .start();
    let (tok, tenant) = token(&c);
    // A host file an image must never make cairn read.
    std::fs::write(p("secret.raw"), vec![0x42u8; 1 << 20]).unwrap();
    sh(Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(p("secret.raw"))
        .arg(p("backing.qcow2")));
    sh(Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-o"])
        .arg(format!("data_file={}", p("secret.raw").display()))
        .arg(p("datafile.qcow2"))
        .arg("1M"));
    std::fs::write(p("notqcow.raw"), vec![7u8; 1 << 20]).unwrap();
    sh(Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(p("huge.qcow2"))
        .arg("100T"));
    let good = Images::new();
    let whole = std::fs::read(good.path("img.qcow2")).unwrap();
    std::fs::write(p("truncated.qcow2"), &whole[..whole.len() / 3]).unwrap();

    // Uploads of bare images are inspected (curl, so that no client cleans up after a
    // failure): 415, the image stays queued, nothing is kept.
    let objects = metric(&c, "cairn_store_objects");
    for (file, fmt) in [
        ("backing.qcow2", "qcow2"),
        ("datafile.qcow2", "qcow2"),
        ("notqcow.raw", "qcow2"),
    ] {
        let id = create_queued(&c, &tok, file, fmt);
        assert_eq!(curl_upload(&c, &tok, &id, &p(file), &[]), "415", "{file}");
        let i = image_json(&c, &tok, &id);
        assert_eq!(i["status"], "queued", "{file}: {i}");
        assert!(
            i["size"].is_null() && i["checksum"].is_null(),
            "{file}: {i}"
        );
    }
    assert_eq!(metric(&c, "cairn_store_objects"), objects);

    // Other containers are not inspected on upload; the raw cache refuses them, and so does
    // a volume made from them. Images the in-process inspector refuses never reach qemu-img;
    // the others reach it only through NBD exports, never as host files.
    let objects = metric(&c, "cairn_store_objects");
    let cases = [
        ("backing.qcow2", "backing file", false),
        ("datafile.qcow2", "data_file", false),
        ("notqcow.raw", "not (qcow2)", false),
        ("huge.qcow2", "virtual size", false),
        ("truncated.qcow2", "qemu-img", true),
    ];
    let mut error_volumes = 0.0;
    for (file, why, reaches_qemu) in cases {
        let before = calls(&log);
        let id = upload(&c, &p(file), "qcow2", "ovf", &format!("ovf-{file}"));
        let i = wait_cache(&c, &tok, &id);
        assert_eq!(i["cache_raw_status"], "Error", "{file}: {i}");
        let err = i["cache_raw_error"].as_str().unwrap_or_default();
        assert!(err.contains(why), "{file}: {err}");
        assert!(i.get("cache_raw_url").is_none(), "{i}");
        let (st, v) = create_volume(
            &c,
            &tok,
            &tenant,
            json!({"volume": {"size": 1, "imageRef": id}}),
        );
        if st == 200 {
            let vid = v["volume"]["id"].as_str().unwrap();
            let v = wait_volume(&c, &tok, &tenant, vid);
            assert_eq!(v["status"], "error", "{file}: {v}");
            error_volumes += 1.0;
        } else {
            assert_eq!(st, 400, "{file}: {v}");
            let m = v["badRequest"]["message"].as_str().unwrap_or_default();
            assert!(
                m.contains("is unacceptable") && m.contains(why),
                "{file}: {v}"
            );
        }
        assert_eq!(
            calls(&log) > before,
            reaches_qemu,
            "{file}: qemu-img calls\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    // The uploads' data (and the failed volume's object) remain: no cache object leaked.
    assert_eq!(
        metric(&c, "cairn_store_objects"),
        objects + cases.len() as f64 + error_volumes
    );
    let list = sh(Command::new("nbdinfo")
        .arg("--list")
        .arg(unix_uri(&c, "").replace(":///?", "://?")));
    assert!(!list.contains("image/"), "{list}");
}

#[test]
fn a_restart_in_the_middle_of_caching_caches_once_and_leaks_nothing() {
    // Fault injection: a qemu-img that announces the conversion and then hangs, until the
    // daemon is killed.
    let dir = common::temp_dir();
    let marker = dir.path().join("converting");
    let wrapper = dir.path().join("qemu-img-hang");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = convert ]; then\n  touch '{m}'\n  i=0\n  while [ ! -e '{m}.stop' ] && [ $i -lt 6000 ]; do sleep 0.1; i=$((i+1)); done\n  exit 1\nfi\nexec qemu-img \"$@\"\n",
            m = marker.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = common::temp_dir();
    let mut c = Serve::new()
        .data_dir(data.path())
        .arg("--admin-password")
        .arg(PW)
        .env("CAIRN_QEMU_IMG", &wrapper)
        .start();
    let (tok, _) = token(&c);
    let imgs = Images::new();
    // Formats qemu-img converts (qcow2 is read in-process).
    let id = upload(&c, &imgs.path("img.vdi"), "vdi", "bare", "restart");
    let deadline = Instant::now() + CONVERT_DEADLINE;
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "no conversion started\n{}",
            c.logs.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let i = image_json(&c, &tok, &id);
    assert_eq!(i["cache_raw_status"], "Caching", "{i}");
    assert_eq!(i["cache_raw_progress"], "0%", "{i}");
    assert_eq!(metric(&c, "cairn_image_conversions_running"), 1.0);
    assert_eq!(
        metric(&c, "cairn_image_conversion_bytes"),
        (64u64 << 20) as f64
    );

    // Deleting an image whose conversion runs cancels it and leaves nothing behind: only
    // the first image's data and its cut conversion's object remain.
    std::fs::remove_file(&marker).unwrap();
    let doomed = upload(&c, &imgs.path("img.vmdk"), "vmdk", "bare", "doomed");
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "no second conversion\n{}",
            c.logs.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(image_json(&c, &tok, &doomed)["cache_raw_status"], "Caching");
    let del = osc(&c, &["image", "delete", &doomed]);
    assert!(del.ok, "{}", del.stderr);
    assert_eq!(metric(&c, "cairn_store_objects"), 2.0);
    assert_eq!(metric(&c, "cairn_image_conversions_running"), 1.0);
    c.stop_with(libc::SIGKILL);

    let c = Serve::new()
        .data_dir(data.path())
        .arg("--admin-password")
        .arg(PW)
        .start();
    let (tok, _) = token(&c);
    let i = wait_cache(&c, &tok, &id);
    assert_eq!(i["cache_raw_status"], "Cached", "{i}");
    compare(&imgs.base(), &unix_uri(&c, &format!("image/{id}")));
    // The image's data and one raw cache: the cut conversion's object went.
    assert_eq!(metric(&c, "cairn_store_objects"), 2.0);
    // Lets the first daemon's orphaned fake qemu-img go.
    std::fs::write(marker.with_extension("stop"), b"").unwrap();
}

#[test]
fn uploads_over_the_cap_or_cut_short_leave_the_image_queued_and_nothing_behind() {
    let c = Serve::new()
        .arg("--admin-password")
        .arg(PW)
        .arg("--image-size-cap")
        .arg("1048576")
        .arg("--show-image-direct-url")
        .start();
    let (tok, _) = token(&c);
    let dir = common::temp_dir();
    let big = dir.path().join("big.raw");
    let small = dir.path().join("small.raw");
    let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&big, &data).unwrap();
    std::fs::write(&small, &data[..512 << 10]).unwrap();
    let id = create_queued(&c, &tok, "capped", "raw");
    let objects = metric(&c, "cairn_store_objects");
    let put = |file: &Path, extra: &[&str]| curl_upload(&c, &tok, &id, file, extra);
    let queued_and_empty = |what: &str| {
        let i = image_json(&c, &tok, &id);
        assert_eq!(i["status"], "queued", "{what}: {i}");
        assert!(
            i["size"].is_null() && i["checksum"].is_null(),
            "{what}: {i}"
        );
        assert_eq!(metric(&c, "cairn_store_objects"), objects, "{what}");
    };
    // Over the cap with a Content-Length (refused before reading) and without one (chunked:
    // refused once the data passes the cap).
    assert_eq!(put(&big, &[]), "413");
    queued_and_empty("declared too large");
    assert_eq!(put(&big, &["-H", "transfer-encoding: chunked"]), "413");
    queued_and_empty("streamed too large");

    // Cut short: the client declares more than it sends and hangs up.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(c.http()).unwrap();
        write!(
            s,
            "PUT /image/v2/images/{id}/file HTTP/1.1\r\nhost: cairn\r\nx-auth-token: {tok}\r\n\
             content-type: application/octet-stream\r\ncontent-length: 1000000\r\n\r\n"
        )
        .unwrap();
        s.write_all(&data[..300_000]).unwrap();
        s.flush().unwrap();
        // Dropped: the connection closes with the body incomplete.
    }
    let deadline = Instant::now() + CONVERT_DEADLINE;
    while image_json(&c, &tok, &id)["status"] != "queued"
        || metric(&c, "cairn_store_objects") != objects
    {
        assert!(
            Instant::now() < deadline,
            "the cut upload never ended\n{}",
            c.logs.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    queued_and_empty("cut short");

    // The image still takes a whole upload, and keeps exactly it.
    assert_eq!(put(&small, &[]), "204");
    let i = image_json(&c, &tok, &id);
    assert_eq!(i["status"], "active", "{i}");
    assert_eq!(i["size"], 512 << 10, "{i}");
    assert_eq!(i["checksum"], md5_hex(&small), "{i}");
    assert_eq!(metric(&c, "cairn_store_objects"), objects + 1.0);
    // A raw image's data is its raw content: shown as `direct_url`, readable over NBD.
    let url = i["direct_url"].as_str().unwrap_or_default();
    assert!(
        url.starts_with("nbd://") && url.ends_with(&format!("/image/{id}")),
        "{i}"
    );
    compare(&small, &unix_uri(&c, &format!("image/{id}")));
}
