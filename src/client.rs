//! `cairn volume|server|project|user ...`: a client of a running daemon's admin API.
//!
//! Credentials come from `clouds.yaml` (`$OS_CLIENT_CONFIG_FILE`, else
//! `<data-dir>/clouds.yaml`, cloud `$OS_CLOUD` or `cairn`), overridden by `OS_AUTH_URL`,
//! `OS_USERNAME`, `OS_PASSWORD`, `OS_PROJECT_NAME`. The client gets a token from Keystone's
//! `/v3/auth/tokens` and finds the Compute endpoint in the token's service catalog, as the
//! OpenStack clients do; volumes, servers and attachments go through the Compute API, users and
//! projects through Keystone.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Data dir whose `clouds.yaml` holds the credentials (unless OS_CLIENT_CONFIG_FILE is set).
    #[arg(long, env = "CAIRN_DATA_DIR", value_name = "DIR", default_value = crate::config::DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,
    /// Cloud to use from clouds.yaml.
    #[arg(long, env = "OS_CLOUD", default_value = "cairn", global = true)]
    pub os_cloud: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (thin: nothing is allocated until written).
    Create {
        /// Size in GiB: `10`, `10G`, `10GiB`, `2T`.
        #[arg(long)]
        size: String,
        /// A display name (need not be unique; commands take it where it is).
        #[arg(long)]
        name: Option<String>,
        /// A free-text description.
        #[arg(long)]
        description: Option<String>,
        /// Allow attaching to several servers at once.
        #[arg(long)]
        multiattach: bool,
        /// Attach it at once to this server (name or id; created if no server has that name)
        /// and print only the NBD URI.
        #[arg(long, value_name = "SERVER")]
        attach: Option<String>,
        /// Fill it from this image (id or unique name): instant from a raw cache or a raw
        /// image, else converted (the volume is `downloading` meanwhile).
        #[arg(long, value_name = "IMAGE")]
        image: Option<String>,
    },
    /// List the project's volumes.
    List,
    /// Show a volume, with its attachments.
    Show {
        /// Volume id, or its name if no other volume has it.
        volume: String,
    },
    /// Delete a volume (it must not be attached).
    Delete {
        /// Volume id, or its name if no other volume has it.
        volume: String,
    },
    /// Attach to a server; prints the attachment with the NBD URI.
    Attach {
        /// Volume id, or its name if no other volume has it.
        volume: String,
        /// Server name or id.
        #[arg(long)]
        server: String,
        /// Device name, e.g. /dev/vdc (default: the next free one).
        #[arg(long)]
        device: Option<String>,
    },
    /// Detach from a server; its NBD clients are disconnected first.
    Detach {
        /// Volume id, or its name if no other volume has it.
        volume: String,
        /// Server name or id (default: the one server the volume is attached to).
        #[arg(long)]
        server: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServerCmd {
    /// Register a server (an instance that will use volumes).
    Create {
        /// Server name.
        name: String,
    },
    /// List the project's servers.
    List,
    /// Delete a server; its volumes are detached.
    Delete {
        /// Server name or id.
        server: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum FsCmd {
    /// Create a shared filesystem, or resize one (same scope and project).
    Create {
        /// Its name: letters, digits, '-', '_', '.'.
        name: String,
        /// Its quota: `4Gb`, `80Gb`, `512Mb`, `2Tb`.
        #[arg(long)]
        size: String,
        /// Who sees it: every instance (`global`, admin), the project's (`project`), or the
        /// instances connected to it (`instance`).
        #[arg(long, default_value = "instance")]
        scope: String,
        /// Scope `project`: the project whose instances see it (default: the caller's).
        #[arg(long)]
        project: Option<String>,
    },
    /// List the filesystems the caller sees.
    List,
    /// Show one.
    Show {
        /// Filesystem name.
        name: String,
    },
    /// Delete one.
    Delete {
        /// Filesystem name.
        name: String,
    },
    /// The instances that see it now.
    Instances {
        /// Filesystem name.
        name: String,
    },
    /// Connect a server to a filesystem of scope `instance`.
    Connect {
        /// Filesystem name (scope `instance`).
        name: String,
        /// Server name or id.
        #[arg(long)]
        server: String,
    },
    /// Disconnect a server from it.
    Disconnect {
        /// Filesystem name.
        name: String,
        /// Server name or id.
        #[arg(long)]
        server: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectCmd {
    /// Create a project.
    Create {
        /// Project name (unique).
        name: String,
        /// A free-text description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List every project.
    List,
    /// Delete a project (it must own no volumes or servers).
    Delete {
        /// Project name or id.
        project: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Create a user with a password and a role on a project.
    Create {
        /// User name (unique).
        name: String,
        /// The password (visible to other local users in `ps`; prefer --password-stdin).
        #[arg(
            long,
            required_unless_present = "password_stdin",
            conflicts_with = "password_stdin"
        )]
        password: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Project (name or id): the user's default project, where the role is granted.
        #[arg(long)]
        project: String,
        /// Role granted on the project.
        #[arg(long, default_value = "member", value_parser = ["reader", "member", "admin"])]
        role: String,
    },
    /// List every user.
    List,
    /// Delete a user, with its role assignments and tokens.
    Delete {
        /// User name or id.
        user: String,
    },
    /// Grant a role on a project to a user.
    Grant {
        /// User name or id.
        user: String,
        /// Project name or id.
        #[arg(long)]
        project: String,
        /// The role.
        #[arg(long, value_parser = ["reader", "member", "admin"])]
        role: String,
    },
    /// Revoke a role on a project from a user.
    Revoke {
        /// User name or id.
        user: String,
        /// Project name or id.
        #[arg(long)]
        project: String,
        /// The role.
        #[arg(long, value_parser = ["reader", "member", "admin"])]
        role: String,
    },
}

#[derive(Debug, Deserialize, Default)]
struct CloudsFile {
    #[serde(default)]
    clouds: BTreeMap<String, Cloud>,
}

#[derive(Debug, Deserialize, Default, Clone)]
struct Cloud {
    #[serde(default)]
    auth: CloudAuth,
}

#[derive(Debug, Deserialize, Default, Clone)]
struct CloudAuth {
    auth_url: Option<String>,
    username: Option<String>,
    password: Option<String>,
    project_name: Option<String>,
}

/// An authenticated session: the token and the endpoints from its catalog.
struct Session {
    agent: ureq::Agent,
    token: String,
    identity: String,
    compute: String,
    /// The Image service, if the catalog has one.
    image: Option<String>,
}

/// The public URL of the catalog's service of `kind`.
fn public_endpoint(catalog: &Value, kind: &str) -> Option<String> {
    catalog.as_array()?.iter().find(|s| s["type"] == kind)?["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["interface"] == "public")?["url"]
        .as_str()
        .map(|u| u.trim_end_matches('/').to_owned())
}

fn credentials(args: &ClientArgs) -> Result<CloudAuth> {
    let path = std::env::var_os("OS_CLIENT_CONFIG_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| args.data_dir.join("clouds.yaml"));
    let mut auth = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let file: CloudsFile = serde_saphyr::from_str(&text)
                .with_context(|| format!("reading {}", path.display()))?;
            file.clouds
                .get(&args.os_cloud)
                .cloned()
                .ok_or_else(|| anyhow!("no cloud {:?} in {}", args.os_cloud, path.display()))?
                .auth
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => CloudAuth::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    auth.auth_url = env("OS_AUTH_URL").or(auth.auth_url);
    auth.username = env("OS_USERNAME").or(auth.username);
    auth.password = env("OS_PASSWORD").or(auth.password);
    auth.project_name = env("OS_PROJECT_NAME").or(auth.project_name);
    if auth.auth_url.is_none() || auth.username.is_none() || auth.password.is_none() {
        bail!(
            "no credentials: expected {} (written by `cairn serve` on first start) or \
             OS_AUTH_URL, OS_USERNAME and OS_PASSWORD",
            path.display()
        );
    }
    Ok(auth)
}

struct Reply {
    status: u16,
    body: Value,
    headers: Vec<(String, String)>,
}

fn send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<Reply> {
    let payload = body.map(Value::to_string).unwrap_or_default();
    let token = token.unwrap_or("");
    let sent = match method {
        "GET" | "DELETE" | "HEAD" => {
            let req = match method {
                "GET" => agent.get(url),
                "HEAD" => agent.head(url),
                _ => agent.delete(url),
            };
            let req = req.header("accept", "application/json");
            let req = if token.is_empty() {
                req
            } else {
                req.header("x-auth-token", token)
            };
            req.call()
        }
        _ => {
            let req = match method {
                "POST" => agent.post(url),
                "PATCH" => agent.patch(url),
                _ => agent.put(url),
            };
            let req = req
                .header("accept", "application/json")
                .header("content-type", "application/json");
            let req = if token.is_empty() {
                req
            } else {
                req.header("x-auth-token", token)
            };
            req.send(payload.as_str())
        }
    };
    let mut resp = sent.with_context(|| format!("{method} {url} (is `cairn serve` running?)"))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let body = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok(Reply {
        status,
        body,
        headers,
    })
}

/// The message inside any family's error body.
fn error_message(body: &Value) -> String {
    match body {
        Value::Object(m) => m
            .values()
            .find_map(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
            .or_else(|| m.get("message").map(|v| v.to_string()))
            .unwrap_or_else(|| body.to_string()),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Session {
    fn open(args: &ClientArgs) -> Result<Session> {
        let auth = credentials(args)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let identity = auth.auth_url.clone().unwrap_or_default();
        let identity = identity.trim_end_matches('/').to_owned();
        let mut body = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": auth.username, "domain": {"name": "Default"}, "password": auth.password}}}}});
        if let Some(p) = &auth.project_name {
            body["auth"]["scope"] = json!({"project": {"name": p, "domain": {"name": "Default"}}});
        }
        let r = send(
            &agent,
            "POST",
            &format!("{identity}/auth/tokens"),
            None,
            Some(&body),
        )?;
        if r.status != 201 {
            bail!(
                "authentication failed ({}): {}",
                r.status,
                error_message(&r.body)
            );
        }
        let token = r
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-subject-token"))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow!("the token reply has no X-Subject-Token"))?;
        let catalog = &r.body["token"]["catalog"];
        let compute = public_endpoint(catalog, "compute")
            .ok_or_else(|| anyhow!("the service catalog has no public compute endpoint"))?;
        let image = public_endpoint(catalog, "image");
        Ok(Session {
            agent,
            token,
            identity,
            compute,
            image,
        })
    }

    /// A call that must succeed with one of `ok` statuses.
    fn call(&self, method: &str, url: &str, body: Option<&Value>, ok: &[u16]) -> Result<Value> {
        let r = send(&self.agent, method, url, Some(&self.token), body)?;
        if !ok.contains(&r.status) {
            bail!("{method} {url} -> {}: {}", r.status, error_message(&r.body));
        }
        Ok(r.body)
    }

    fn compute(&self, method: &str, path: &str, body: Option<&Value>, ok: &[u16]) -> Result<Value> {
        self.call(method, &format!("{}{path}", self.compute), body, ok)
    }

    fn keystone(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        ok: &[u16],
    ) -> Result<Value> {
        self.call(method, &format!("{}{path}", self.identity), body, ok)
    }

    /// A server id from a name or id.
    fn server_id(&self, name_or_id: &str) -> Result<Option<String>> {
        let list = self.compute("GET", "/servers", None, &[200])?;
        let servers = list["servers"].as_array().cloned().unwrap_or_default();
        let by = |key: &str| {
            servers
                .iter()
                .find(|s| s[key] == name_or_id)
                .and_then(|s| s["id"].as_str().map(str::to_owned))
        };
        Ok(by("id").or_else(|| by("name")))
    }

    /// An image id from an id or a unique name.
    fn image_id(&self, name_or_id: &str) -> Result<String> {
        if uuid::Uuid::parse_str(name_or_id).is_ok() {
            return Ok(name_or_id.to_owned());
        }
        let base = self
            .image
            .as_deref()
            .ok_or_else(|| anyhow!("the service catalog has no public image endpoint"))?;
        let name: String = form_urlencoded::byte_serialize(name_or_id.as_bytes()).collect();
        let list = self.call(
            "GET",
            &format!("{base}/v2/images?name={name}"),
            None,
            &[200],
        )?;
        let found: Vec<String> = list["images"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| s(&i["id"]))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => bail!("no image is named {name_or_id:?}"),
            many => bail!(
                "{} images are named {name_or_id:?}; give an id: {}",
                many.len(),
                many.join(", ")
            ),
        }
    }

    /// A volume id from an id or a unique display name.
    fn volume_id(&self, name_or_id: &str) -> Result<String> {
        let list = self.compute("GET", "/os-volumes/detail", None, &[200])?;
        let vols = list["volumes"].as_array().cloned().unwrap_or_default();
        if let Some(v) = vols.iter().find(|v| {
            v["id"]
                .as_str()
                .is_some_and(|id| id.eq_ignore_ascii_case(name_or_id))
        }) {
            return Ok(s(&v["id"]));
        }
        let named: Vec<&Value> = vols
            .iter()
            .filter(|v| v["displayName"] == name_or_id)
            .collect();
        match named.as_slice() {
            [one] => Ok(s(&one["id"])),
            [] => bail!("no volume with id or name {name_or_id:?}"),
            _ => bail!(
                "{} volumes are named {name_or_id:?}: use the id",
                named.len()
            ),
        }
    }

    fn keystone_id(&self, kind: &str, name_or_id: &str) -> Result<String> {
        let list = self.keystone("GET", &format!("/{kind}"), None, &[200])?;
        list[kind]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["id"] == name_or_id || p["name"] == name_or_id)
            .and_then(|p| p["id"].as_str().map(str::to_owned))
            .ok_or_else(|| anyhow!("no {} named {name_or_id:?}", kind.trim_end_matches('s')))
    }
}

/// `10`, `10G`, `10GiB`, `2T` -> GiB.
pub fn parse_size_gib(s: &str) -> Result<u64> {
    let t = s.trim();
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = t[digits.len()..].to_ascii_lowercase();
    let n: u64 = digits
        .parse()
        .map_err(|_| anyhow!("invalid size {s:?}: expected e.g. 10G"))?;
    let gib = match unit.as_str() {
        "" | "g" | "gb" | "gib" => Some(n),
        "t" | "tb" | "tib" => n.checked_mul(1024),
        _ => bail!("invalid size unit in {s:?}: use G or T (volumes are whole GiB)"),
    };
    match gib {
        Some(g) if g > 0 => Ok(g),
        Some(_) => bail!("size must be at least 1G"),
        None => bail!("size {s:?} is too large"),
    }
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::ASCII_MARKDOWN);
    t.set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    println!("{t}");
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_volume(v: &Value) {
    let attachments: Vec<String> = v["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a.get("serverId").is_some())
        .map(|a| format!("{} on {}", s(&a["device"]), s(&a["serverId"])))
        .collect();
    print_table(
        &["field", "value"],
        vec![
            vec!["id".into(), s(&v["id"])],
            vec!["name".into(), s(&v["displayName"])],
            vec!["status".into(), s(&v["status"])],
            vec!["size (GiB)".into(), s(&v["size"])],
            vec!["created".into(), s(&v["createdAt"])],
            vec!["attachments".into(), attachments.join(", ")],
        ],
    );
}

fn print_attachment(a: &Value) {
    print_table(
        &["field", "value"],
        vec![
            vec!["volume".into(), s(&a["volumeId"])],
            vec!["server".into(), s(&a["serverId"])],
            vec!["device".into(), s(&a["device"])],
            vec!["nbd uri".into(), s(&a["nbdUri"])],
        ],
    );
}

fn out(args: &ClientArgs, v: &Value, human: impl FnOnce(&Value)) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        human(v);
    }
    Ok(())
}

pub fn volume(args: &ClientArgs, cmd: VolumeCmd) -> Result<()> {
    let sess = Session::open(args)?;
    match cmd {
        VolumeCmd::Create {
            size,
            name,
            description,
            multiattach,
            attach,
            image,
        } => {
            let gib = parse_size_gib(&size)?;
            let mut body = json!({"volume": {"size": gib, "display_name": name,
                "display_description": description}});
            if let Some(image) = image {
                body["volume"]["imageRef"] = json!(sess.image_id(&image)?);
            }
            if multiattach {
                // The os-volumes create schema has no `multiattach`: cinder's convention, a
                // volume type of that name, says it.
                body["volume"]["volume_type"] = json!("multiattach");
            }
            let v = sess.compute("POST", "/os-volumes", Some(&body), &[200, 202])?;
            let v = v["volume"].clone();
            let Some(server) = attach else {
                return out(args, &v, print_volume);
            };
            let id = s(&v["id"]);
            let server_id = match sess.server_id(&server)? {
                Some(id) => id,
                None => {
                    let created = sess.compute(
                        "POST",
                        "/servers",
                        Some(&json!({"server": {"name": server}})),
                        &[200, 202],
                    )?;
                    s(&created["server"]["id"])
                }
            };
            let a = sess.compute(
                "POST",
                &format!("/servers/{server_id}/os-volume_attachments"),
                Some(&json!({"volumeAttachment": {"volumeId": id}})),
                &[200, 202],
            )?;
            let a = &a["volumeAttachment"];
            if args.json {
                println!("{}", serde_json::to_string_pretty(a)?);
            } else {
                println!("{}", s(&a["nbdUri"]));
            }
            Ok(())
        }
        VolumeCmd::List => {
            let l = sess.compute("GET", "/os-volumes/detail", None, &[200])?;
            out(args, &l["volumes"], |vs| {
                let rows = vs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| {
                        vec![
                            s(&v["id"]),
                            s(&v["displayName"]),
                            s(&v["status"]),
                            s(&v["size"]),
                        ]
                    })
                    .collect();
                print_table(&["id", "name", "status", "size (GiB)"], rows);
            })
        }
        VolumeCmd::Show { volume } => {
            let volume = sess.volume_id(&volume)?;
            let v = sess.compute("GET", &format!("/os-volumes/{volume}"), None, &[200])?;
            out(args, &v["volume"], print_volume)
        }
        VolumeCmd::Delete { volume } => {
            let volume = sess.volume_id(&volume)?;
            sess.compute(
                "DELETE",
                &format!("/os-volumes/{volume}"),
                None,
                &[202, 204],
            )?;
            if !args.json {
                println!("deleted volume {volume}");
            }
            Ok(())
        }
        VolumeCmd::Attach {
            volume,
            server,
            device,
        } => {
            let volume = sess.volume_id(&volume)?;
            let server_id = sess
                .server_id(&server)?
                .ok_or_else(|| anyhow!("no server named {server:?}"))?;
            let a = sess.compute(
                "POST",
                &format!("/servers/{server_id}/os-volume_attachments"),
                Some(&json!({"volumeAttachment": {"volumeId": volume, "device": device}})),
                &[200, 202],
            )?;
            out(args, &a["volumeAttachment"], print_attachment)
        }
        VolumeCmd::Detach { volume, server } => {
            let volume = sess.volume_id(&volume)?;
            let server_id = match server {
                Some(server) => sess
                    .server_id(&server)?
                    .ok_or_else(|| anyhow!("no server named {server:?}"))?,
                None => {
                    let v = sess.compute("GET", &format!("/os-volumes/{volume}"), None, &[200])?;
                    let servers: Vec<String> = v["volume"]["attachments"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a["serverId"].as_str().map(str::to_owned))
                        .collect();
                    match servers.as_slice() {
                        [one] => one.clone(),
                        [] => bail!("volume {volume} is not attached to any server"),
                        many => bail!(
                            "volume {volume} is attached to {} servers ({}): say which with --server",
                            many.len(),
                            many.join(", ")
                        ),
                    }
                }
            };
            sess.compute(
                "DELETE",
                &format!("/servers/{server_id}/os-volume_attachments/{volume}"),
                None,
                &[202, 204],
            )?;
            if !args.json {
                println!("detached volume {volume} from {server_id}");
            }
            Ok(())
        }
    }
}

pub fn server(args: &ClientArgs, cmd: ServerCmd) -> Result<()> {
    let sess = Session::open(args)?;
    match cmd {
        ServerCmd::Create { name } => {
            let v = sess.compute(
                "POST",
                "/servers",
                Some(&json!({"server": {"name": name}})),
                &[200, 202],
            )?;
            out(args, &v["server"], |v| {
                print_table(&["id", "name"], vec![vec![s(&v["id"]), name.clone()]])
            })
        }
        ServerCmd::List => {
            let l = sess.compute("GET", "/servers", None, &[200])?;
            out(args, &l["servers"], |vs| {
                let rows = vs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| vec![s(&v["id"]), s(&v["name"])])
                    .collect();
                print_table(&["id", "name"], rows);
            })
        }
        ServerCmd::Delete { server } => {
            let id = sess
                .server_id(&server)?
                .ok_or_else(|| anyhow!("no server named {server:?}"))?;
            sess.compute("DELETE", &format!("/servers/{id}"), None, &[202, 204])?;
            if !args.json {
                println!("deleted server {id}");
            }
            Ok(())
        }
    }
}

pub fn fs(args: &ClientArgs, cmd: FsCmd) -> Result<()> {
    let sess = Session::open(args)?;
    let entry_row = |v: &Value| {
        vec![
            s(&v["name"]),
            s(&v["size"]),
            s(&v["scope"]),
            v["project"].as_str().unwrap_or("").to_owned(),
        ]
    };
    const HEADER: [&str; 4] = ["name", "size", "scope", "project"];
    let server = |name: &str| {
        sess.server_id(name)?
            .ok_or_else(|| anyhow!("no server named {name:?}"))
    };
    match cmd {
        FsCmd::Create {
            name,
            size,
            scope,
            project,
        } => {
            let mut e = json!({"size": size, "scope": scope});
            if let Some(p) = project {
                e["project"] = json!(p);
            }
            let v = sess.compute(
                "PUT",
                &format!("/os-filesystem/{name}"),
                Some(&json!({ "fs_entry": e })),
                &[200],
            )?;
            out(args, &v["fs_entry"], |v| {
                print_table(&HEADER, vec![entry_row(v)])
            })
        }
        FsCmd::List => {
            let l = sess.compute("GET", "/os-filesystem", None, &[200])?;
            out(args, &l["fs_entries"], |vs| {
                let rows = vs.as_array().into_iter().flatten().map(entry_row).collect();
                print_table(&HEADER, rows);
            })
        }
        FsCmd::Show { name } => {
            let v = sess.compute("GET", &format!("/os-filesystem/{name}"), None, &[200])?;
            out(args, &v["fs_entry"], |v| {
                print_table(&HEADER, vec![entry_row(v)])
            })
        }
        FsCmd::Delete { name } => {
            sess.compute("DELETE", &format!("/os-filesystem/{name}"), None, &[202])?;
            if !args.json {
                println!("deleted filesystem {name}");
            }
            Ok(())
        }
        FsCmd::Instances { name } => {
            let l = sess.compute(
                "GET",
                &format!("/os-filesystem/{name}/instances"),
                None,
                &[200],
            )?;
            out(args, &l["instance_entries"], |vs| {
                let rows = vs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| vec![s(&v["id"])])
                    .collect();
                print_table(&["instance"], rows);
            })
        }
        FsCmd::Connect { name, server: srv } => {
            let id = server(&srv)?;
            let v = sess.compute(
                "PUT",
                &format!("/os-filesystem/{name}/instances/{id}"),
                None,
                &[200],
            )?;
            out(args, &v["instance_entry"], |_| {
                println!("connected {id} to filesystem {name}")
            })
        }
        FsCmd::Disconnect { name, server: srv } => {
            let id = server(&srv)?;
            sess.compute(
                "DELETE",
                &format!("/os-filesystem/{name}/instances/{id}"),
                None,
                &[202],
            )?;
            if !args.json {
                println!("disconnected {id} from filesystem {name}");
            }
            Ok(())
        }
    }
}

pub fn project(args: &ClientArgs, cmd: ProjectCmd) -> Result<()> {
    let sess = Session::open(args)?;
    match cmd {
        ProjectCmd::Create { name, description } => {
            let v = sess.keystone(
                "POST",
                "/projects",
                Some(
                    &json!({"project": {"name": name, "description": description,
                    "domain_id": "default", "enabled": true}}),
                ),
                &[201],
            )?;
            out(args, &v["project"], |p| {
                print_table(&["id", "name"], vec![vec![s(&p["id"]), s(&p["name"])]])
            })
        }
        ProjectCmd::List => {
            let l = sess.keystone("GET", "/projects", None, &[200])?;
            out(args, &l["projects"], |ps| {
                let rows = ps
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| vec![s(&p["id"]), s(&p["name"])])
                    .collect();
                print_table(&["id", "name"], rows);
            })
        }
        ProjectCmd::Delete { project } => {
            let id = sess.keystone_id("projects", &project)?;
            sess.keystone("DELETE", &format!("/projects/{id}"), None, &[204])?;
            if !args.json {
                println!("deleted project {id}");
            }
            Ok(())
        }
    }
}

pub fn user(args: &ClientArgs, cmd: UserCmd) -> Result<()> {
    let sess = Session::open(args)?;
    match cmd {
        UserCmd::Create {
            name,
            password,
            password_stdin,
            project,
            role,
        } => {
            let password = match password {
                Some(p) if !password_stdin => p,
                _ => {
                    let mut line = String::new();
                    std::io::stdin()
                        .read_line(&mut line)
                        .context("reading the password from stdin")?;
                    let p = line.trim_end_matches(['\n', '\r']).to_owned();
                    if p.is_empty() {
                        bail!("empty password on stdin");
                    }
                    p
                }
            };
            let project_id = sess.keystone_id("projects", &project)?;
            let v = sess.keystone(
                "POST",
                "/users",
                Some(&json!({"user": {"name": name, "password": password,
                    "default_project_id": project_id, "domain_id": "default", "enabled": true}})),
                &[201],
            )?;
            let user_id = s(&v["user"]["id"]);
            let role_id = sess.keystone_id("roles", &role)?;
            sess.keystone(
                "PUT",
                &format!("/projects/{project_id}/users/{user_id}/roles/{role_id}"),
                None,
                &[200, 201, 204],
            )?;
            out(args, &v["user"], |u| {
                print_table(
                    &["id", "name", "project", "role"],
                    vec![vec![
                        s(&u["id"]),
                        s(&u["name"]),
                        project_id.clone(),
                        role.clone(),
                    ]],
                )
            })
        }
        UserCmd::List => {
            let l = sess.keystone("GET", "/users", None, &[200])?;
            out(args, &l["users"], |us| {
                let rows = us
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|u| vec![s(&u["id"]), s(&u["name"]), s(&u["default_project_id"])])
                    .collect();
                print_table(&["id", "name", "default project"], rows);
            })
        }
        UserCmd::Grant {
            user,
            project,
            role,
        } => grant(&sess, args, "PUT", &user, &project, &role),
        UserCmd::Revoke {
            user,
            project,
            role,
        } => grant(&sess, args, "DELETE", &user, &project, &role),
        UserCmd::Delete { user } => {
            let id = sess.keystone_id("users", &user)?;
            sess.keystone("DELETE", &format!("/users/{id}"), None, &[204])?;
            if !args.json {
                println!("deleted user {id}");
            }
            Ok(())
        }
    }
}

/// PUT (grant) or DELETE (revoke) one role assignment.
fn grant(
    sess: &Session,
    args: &ClientArgs,
    method: &str,
    user: &str,
    project: &str,
    role: &str,
) -> Result<()> {
    let user_id = sess.keystone_id("users", user)?;
    let project_id = sess.keystone_id("projects", project)?;
    let role_id = sess.keystone_id("roles", role)?;
    sess.keystone(
        method,
        &format!("/projects/{project_id}/users/{user_id}/roles/{role_id}"),
        None,
        &[200, 201, 204],
    )?;
    if !args.json {
        let verb = if method == "PUT" {
            "granted"
        } else {
            "revoked"
        };
        println!("{verb} {role} on {project} to {user}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        use super::parse_size_gib as p;
        assert_eq!(p("10").unwrap(), 10);
        assert_eq!(p("10G").unwrap(), 10);
        assert_eq!(p("10GiB").unwrap(), 10);
        assert_eq!(p("2T").unwrap(), 2048);
        assert!(p("0G").is_err());
        assert!(p("10M").is_err());
        assert!(p("x").is_err());
        assert!(p("99999999999999999999T").is_err());
    }
}
