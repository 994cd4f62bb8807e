//! Identity: projects, users (argon2-hashed passwords), role assignments and tokens (stored as
//! SHA-256 digests), plus the first-start bootstrap (`admin` project and user, clouds.yaml).
//!
//! Rules (Keystone's default policy reduced to cairn's three roles):
//! - `admin` (on any project) manages projects, users and role assignments and sees them all;
//! - anyone else sees only the project of their token and their own user: everything else is
//!   Forbidden;
//! - a token's roles are computed at validation time from the assignments, so revoking a role
//!   takes effect at once; a token whose user holds no role on its project any more is invalid.
//!
//! Roles imply weaker ones (admin -> member -> reader), as in a Keystone bootstrapped with
//! `keystone-manage bootstrap`: a token shows the assigned role and every role it implies.

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    sync::OnceLock,
};

use admin_api::{model::*, time_fmt};
use argon2::{
    Argon2,
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{Settings, TxError, internal, new_id, now, parse_ts, ts};
use crate::catalog::Catalog;

type Tx<T> = Result<T, TxError>;

/// Keystone's generic answer to any failed authentication (never says which part was wrong).
pub const AUTH_REQUIRED: &str = "The request you have made requires authentication.";

/// The cloud name written to clouds.yaml.
pub const CLOUD_NAME: &str = "cairn";

fn unauthorized() -> ServiceError {
    ServiceError::Unauthorized(AUTH_REQUIRED.into())
}

fn forbidden(action: &str) -> ServiceError {
    ServiceError::Forbidden(format!(
        "You are not authorized to perform the requested action: {action}."
    ))
}

fn need_admin(caller: &Caller, action: &str) -> ServiceResult<()> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(forbidden(action))
    }
}

fn not_found(kind: &str, id: &str) -> ServiceError {
    ServiceError::NotFound(format!("Could not find {kind}: {id}."))
}

/// `n` bytes from the thread-local CSPRNG.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::fill(&mut b[..]);
    b
}

/// A bearer token: 32 random bytes, base64url (43 characters).
fn new_token() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

/// What the catalog stores instead of the token.
fn token_digest(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A strong random password: 18 bytes -> 24 base64url characters.
fn random_password() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<18>())
}

/// Token audit id, as Keystone makes them: 16 random bytes, base64url (22 characters).
fn new_audit_id() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<16>())
}

fn hash_password(password: &str) -> ServiceResult<String> {
    // The salt comes from `rand` (not password-hash's rand_core re-export, whose version
    // differs from ours).
    let salt = SaltString::encode_b64(&random_bytes::<16>())
        .map_err(|e| ServiceError::Internal(format!("password salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| {
            tracing::error!(error = %e, "hashing a password");
            ServiceError::Internal("internal error; see the daemon log".into())
        })
}

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Argon2 off the async workers. Without a stored hash (unknown user, or password login
/// disabled) a dummy hash is checked anyway, so timing does not tell which users exist.
async fn check_password(hash: Option<String>, password: String) -> bool {
    static DUMMY: OnceLock<String> = OnceLock::new();
    tokio::task::spawn_blocking(move || match hash {
        Some(h) => verify_password(&h, &password),
        None => {
            let dummy = DUMMY.get_or_init(|| hash_password(&random_password()).unwrap_or_default());
            let _ = verify_password(dummy, &password);
            false
        }
    })
    .await
    .unwrap_or(false)
}

/// Token timestamps are stored fixed-width (`...:SS.ffffffZ`) so that SQL can compare them as
/// text (the purge of expired tokens uses the `tokens_expires` index).
fn token_ts(t: OffsetDateTime) -> String {
    time_fmt::keystone(t)
}

/// Effective roles of an assignment set: each assigned role and every weaker one.
fn effective_roles(assigned: &[Role]) -> Vec<Role> {
    let top = assigned.iter().max();
    let mut out: Vec<Role> = Role::ALL
        .into_iter()
        .filter(|r| top.is_some_and(|t| r <= t))
        .collect();
    out.reverse(); // strongest first
    out
}

fn project_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Project> {
    Ok(Project {
        id: row.get(0)?,
        name: row.get(1)?,
        description: row.get(2)?,
        enabled: row.get(3)?,
    })
}

fn user_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: row.get(0)?,
        name: row.get(1)?,
        default_project_id: row.get(2)?,
        enabled: row.get(3)?,
    })
}

const PROJECT_COLS: &str = "id, name, description, enabled";
const USER_COLS: &str = "id, name, default_project_id, enabled";

/// By id, then by name.
fn find_project(conn: &Connection, id_or_name: &str) -> Tx<Option<Project>> {
    let sql = format!(
        "SELECT {PROJECT_COLS} FROM projects WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id_or_name], project_row)
        .optional()?)
}

fn find_user(conn: &Connection, id_or_name: &str) -> Tx<Option<User>> {
    let sql = format!(
        "SELECT {USER_COLS} FROM users WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id_or_name], user_row)
        .optional()?)
}

fn find_role(conn: &Connection, id_or_name: &str) -> Tx<Option<Named>> {
    Ok(conn
        .prepare_cached(
            "SELECT id, name FROM roles WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1",
        )?
        .query_row([id_or_name], |r| {
            Ok(Named {
                id: r.get(0)?,
                name: r.get(1)?,
            })
        })
        .optional()?)
}

/// Assigned roles of a user on a project.
fn assigned_roles(conn: &Connection, user_id: &str, project_id: &str) -> Tx<Vec<Role>> {
    let mut stmt = conn.prepare_cached(
        "SELECT r.name FROM role_assignments a JOIN roles r ON r.id = a.role_id
         WHERE a.user_id = ?1 AND a.project_id = ?2",
    )?;
    let names = stmt
        .query_map([user_id, project_id], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(names.iter().filter_map(|n| Role::parse(n)).collect())
}

/// `{id, name}` of each role, for the token body.
fn role_ids(table: &[Named], roles: &[Role]) -> Vec<Named> {
    roles
        .iter()
        .filter_map(|r| table.iter().find(|n| n.name == r.as_str()).cloned())
        .collect()
}

/// A user's password hash and state, for authentication.
struct Credentials {
    user_id: String,
    hash: Option<String>,
    enabled: bool,
}

pub struct Identity {
    pub(crate) catalog: Catalog,
    pub(crate) settings: Settings,
    /// The role table: fixed once bootstrapped (roles are never created or deleted), so token
    /// validation need not read it.
    roles: OnceLock<Vec<Named>>,
}

impl Identity {
    pub fn new(catalog: Catalog, settings: Settings) -> Identity {
        Identity {
            catalog,
            settings,
            roles: OnceLock::new(),
        }
    }

    /// The role table, read once.
    async fn role_table(&self) -> ServiceResult<Vec<Named>> {
        if let Some(t) = self.roles.get() {
            return Ok(t.clone());
        }
        let table = self
            .read(|conn| {
                let mut stmt = conn.prepare_cached("SELECT id, name FROM roles")?;
                Ok(stmt
                    .query_map([], |r| {
                        Ok(Named {
                            id: r.get(0)?,
                            name: r.get(1)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await?;
        if table.len() == Role::ALL.len() {
            let _ = self.roles.set(table.clone());
        }
        Ok(table)
    }

    /// Records the project and user of a caller that an external identity service vouched
    /// for (`--identity-url`), as Keystone keeps shadow users: what this daemon makes for
    /// them (volumes, servers) refers to both. Password login stays off for the user; a name
    /// already taken here gets the id beside it.
    pub async fn shadow(&self, caller: &Caller) -> ServiceResult<()> {
        let c = caller.clone();
        self.tx(move |conn| {
            let t = ts(now());
            let named = |table: &str, id: &str, name: &str| -> rusqlite::Result<String> {
                let taken: bool = conn.query_row(
                    &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE name = ?1 AND id != ?2)"),
                    params![name, id],
                    |r| r.get(0),
                )?;
                Ok(if taken || name.is_empty() {
                    format!("{name} ({id})")
                } else {
                    name.to_owned()
                })
            };
            let project = named("projects", &c.project_id, &c.project_name)?;
            conn.execute(
                "INSERT OR IGNORE INTO projects (id, name, description, enabled, created_at) \
                 VALUES (?1, ?2, 'from the identity service', 1, ?3)",
                params![c.project_id, project, t],
            )?;
            let user = named("users", &c.user_id, &c.user_name)?;
            conn.execute(
                "INSERT OR IGNORE INTO users (id, name, password_hash, default_project_id, \
                 enabled, created_at) VALUES (?1, ?2, NULL, ?3, 1, ?4)",
                params![c.user_id, user, c.project_id, t],
            )?;
            Ok(())
        })
        .await
    }

    /// Runs `f` in one IMMEDIATE transaction, committing only on success.
    async fn tx<T, F>(&self, f: F) -> ServiceResult<T>
    where
        F: FnOnce(&Connection) -> Tx<T> + Send + 'static,
        T: Send + 'static,
    {
        super::immediate(&self.catalog, f).await
    }

    /// A read outside any explicit transaction (one statement is atomic by itself).
    async fn read<T, F>(&self, f: F) -> ServiceResult<T>
    where
        F: FnOnce(&Connection) -> Tx<T> + Send + 'static,
        T: Send + 'static,
    {
        let out = self
            .catalog
            .call(move |conn| Ok(f(conn)))
            .await
            .map_err(internal)?;
        out.map_err(ServiceError::from)
    }

    /// First start (no users yet): project `admin`, roles reader/member/admin, user `admin`
    /// (admin on `admin`, default project `admin`) with `password` or a random one; writes
    /// `<data-dir>/clouds.yaml` (mode 0600) with cloud `cairn`. Later starts change nothing.
    pub async fn bootstrap(
        &self,
        layout: &crate::config::Layout,
        password: Option<&str>,
    ) -> anyhow::Result<()> {
        let clouds = layout.data_dir.join("clouds.yaml");
        let users: i64 = self
            .catalog
            .call(|conn| Ok(conn.query_row("SELECT count(*) FROM users", [], |r| r.get(0))?))
            .await?;
        if users > 0 {
            if password.is_some() {
                tracing::info!(
                    "identity already bootstrapped: --admin-password / CAIRN_ADMIN_PASSWORD is \
                     only used on first start and is ignored"
                );
            }
            if !clouds.exists() {
                tracing::warn!(
                    path = %clouds.display(),
                    "clouds.yaml is missing and cairn does not know the admin password (only \
                     its hash); write it by hand with the password you set"
                );
            } else if let Err(e) = refresh_auth_url(&clouds, &self.settings.public_url) {
                tracing::warn!(path = %clouds.display(), "updating clouds.yaml: {e:#}");
            }
            return Ok(());
        }

        let (password, generated) = match password {
            Some(p) if !p.is_empty() => (p.to_owned(), false),
            _ => (random_password(), true),
        };
        let hash = {
            let p = password.clone();
            tokio::task::spawn_blocking(move || hash_password(&p)).await??
        };
        // clouds.yaml first: should the commit below fail, the next start bootstraps (and
        // writes it) again; the other order could lose a random password for good.
        write_clouds_yaml(
            &clouds,
            &self.settings.public_url,
            "admin",
            &password,
            "admin",
        )?;

        let created = now();
        self.tx(move |conn| {
            for role in Role::ALL {
                conn.execute(
                    "INSERT OR IGNORE INTO roles (id, name) VALUES (?1, ?2)",
                    params![new_id(), role.as_str()],
                )?;
            }
            let project_id = match find_project(conn, "admin")? {
                Some(p) => p.id,
                None => {
                    let id = new_id();
                    conn.execute(
                        "INSERT INTO projects (id, name, description, enabled, created_at)
                         VALUES (?1, 'admin', 'Bootstrap project for initializing the cloud.', 1, ?2)",
                        params![id, super::ts(created)],
                    )?;
                    id
                }
            };
            let user_id = new_id();
            conn.execute(
                "INSERT INTO users (id, name, password_hash, default_project_id, enabled, created_at)
                 VALUES (?1, 'admin', ?2, ?3, 1, ?4)",
                params![user_id, hash, project_id, super::ts(created)],
            )?;
            conn.execute(
                "INSERT INTO role_assignments (user_id, project_id, role_id)
                 SELECT ?1, ?2, id FROM roles WHERE name = 'admin'",
                params![user_id, project_id],
            )?;
            Ok(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the admin project and user: {e}"))?;
        tracing::info!(
            path = %clouds.display(),
            cloud = CLOUD_NAME,
            password = if generated { "generated" } else { "from --admin-password" },
            "identity bootstrapped: user admin on project admin; credentials in clouds.yaml \
             (OS_CLIENT_CONFIG_FILE={} openstack --os-cloud {CLOUD_NAME} ...)",
            clouds.display()
        );
        Ok(())
    }

    pub async fn issue_token(&self, req: AuthRequest) -> ServiceResult<IssuedToken> {
        // Who: a password (checked off the catalog thread) or an existing token.
        let (user_id, methods, cap) = match req.method {
            AuthMethod::Password { user, password } => {
                let creds = self
                    .read(move |conn| {
                        let sql = "SELECT id, password_hash, enabled FROM users WHERE ";
                        let (cond, key) = match &user {
                            UserRef::Id(id) => ("id = ?1", id.as_str()),
                            UserRef::Name { name } => ("name = ?1", name.as_str()),
                        };
                        Ok(conn
                            .prepare_cached(&format!("{sql}{cond}"))?
                            .query_row([key], |r| {
                                Ok(Credentials {
                                    user_id: r.get(0)?,
                                    hash: r.get(1)?,
                                    enabled: r.get(2)?,
                                })
                            })
                            .optional()?)
                    })
                    .await?;
                let (hash, user_id, enabled) = match creds {
                    Some(c) => (c.hash, Some(c.user_id), c.enabled),
                    None => (None, None, false),
                };
                if !check_password(hash, password).await || !enabled {
                    return Err(unauthorized());
                }
                let Some(user_id) = user_id else {
                    return Err(unauthorized());
                };
                (user_id, vec!["password".to_owned()], None)
            }
            AuthMethod::Token { token } => {
                let info = self.validate_token(&token).await?;
                let mut methods = info.methods.clone();
                if !methods.iter().any(|m| m == "token") {
                    methods.push("token".to_owned());
                }
                // A token made from a token never outlives it (as Keystone).
                (info.caller.user_id, methods, Some(info.expires_at))
            }
        };

        let token = new_token();
        let digest = token_digest(&token);
        let issued_at = now();
        let ttl = time::Duration::try_from(self.settings.token_ttl).unwrap_or(time::Duration::MAX);
        let mut expires_at = issued_at.checked_add(ttl).unwrap_or(issued_at);
        if let Some(cap) = cap {
            expires_at = expires_at.min(cap);
        }
        let scope = req.scope;
        let table = self.role_table().await?;
        let info = self
            .tx(move |conn| {
                let user = find_user_by_id(conn, &user_id)?.ok_or_else(unauthorized)?;
                let project = match &scope {
                    Some(ProjectRef::Id(id)) => conn
                        .prepare_cached(&format!(
                            "SELECT {PROJECT_COLS} FROM projects WHERE id = ?1"
                        ))?
                        .query_row([id], project_row)
                        .optional()?,
                    Some(ProjectRef::Name { name }) => conn
                        .prepare_cached(&format!(
                            "SELECT {PROJECT_COLS} FROM projects WHERE name = ?1"
                        ))?
                        .query_row([name], project_row)
                        .optional()?,
                    None => match &user.default_project_id {
                        Some(id) => conn
                            .prepare_cached(&format!(
                                "SELECT {PROJECT_COLS} FROM projects WHERE id = ?1"
                            ))?
                            .query_row([id], project_row)
                            .optional()?,
                        None => {
                            return Err(ServiceError::Unauthorized(format!(
                                "User {} has no default project; ask for a project scope.",
                                user.id
                            ))
                            .into());
                        }
                    },
                };
                let Some(project) = project else {
                    return Err(unauthorized().into());
                };
                let assigned = assigned_roles(conn, &user.id, &project.id)?;
                if assigned.is_empty() || !project.enabled {
                    return Err(ServiceError::Unauthorized(format!(
                        "User {} has no access to project {}.",
                        user.id, project.id
                    ))
                    .into());
                }
                let roles = effective_roles(&assigned);
                let audit_id = new_audit_id();
                // Expired tokens go as new ones come: the table stays the size of the live set.
                conn.prepare_cached("DELETE FROM tokens WHERE expires_at < ?1")?
                    .execute([token_ts(issued_at)])?;
                conn.prepare_cached(
                    "INSERT INTO tokens (token_hash, user_id, project_id, audit_id, methods,
                                         issued_at, expires_at, revoked)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)",
                )?
                .execute(params![
                    digest,
                    user.id,
                    project.id,
                    audit_id,
                    serde_json::to_string(&methods).unwrap_or_else(|_| "[]".into()),
                    token_ts(issued_at),
                    token_ts(expires_at),
                ])?;
                Ok(TokenInfo {
                    role_ids: role_ids(&table, &roles),
                    caller: Caller {
                        user_id: user.id,
                        user_name: user.name,
                        project_id: project.id,
                        project_name: project.name,
                        roles,
                    },
                    methods,
                    audit_id,
                    issued_at,
                    expires_at,
                })
            })
            .await?;
        Ok(IssuedToken { token, info })
    }

    /// One indexed lookup: the token row by its digest (primary key) joined with its user,
    /// project and the user's roles there.
    pub async fn validate_token(&self, token: &str) -> ServiceResult<TokenInfo> {
        let digest = token_digest(token);
        let found = self
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT t.user_id, u.name, t.project_id, p.name, t.audit_id, t.methods,
                            t.issued_at, t.expires_at, t.revoked, u.enabled, p.enabled,
                            r.id, r.name
                     FROM tokens t
                     JOIN users u ON u.id = t.user_id
                     JOIN projects p ON p.id = t.project_id
                     LEFT JOIN role_assignments a
                            ON a.user_id = t.user_id AND a.project_id = t.project_id
                     LEFT JOIN roles r ON r.id = a.role_id
                     WHERE t.token_hash = ?1",
                )?;
                let mut rows = stmt.query([&digest])?;
                let mut info: Option<(TokenInfo, bool)> = None;
                let mut assigned = Vec::new();
                while let Some(row) = rows.next()? {
                    if info.is_none() {
                        let methods: String = row.get(5)?;
                        let revoked: bool = row.get(8)?;
                        let user_enabled: bool = row.get(9)?;
                        let project_enabled: bool = row.get(10)?;
                        info = Some((
                            TokenInfo {
                                caller: Caller {
                                    user_id: row.get(0)?,
                                    user_name: row.get(1)?,
                                    project_id: row.get(2)?,
                                    project_name: row.get(3)?,
                                    roles: Vec::new(),
                                },
                                role_ids: Vec::new(),
                                methods: serde_json::from_str(&methods).unwrap_or_default(),
                                audit_id: row.get(4)?,
                                issued_at: parse_ts(&row.get::<_, String>(6)?)?,
                                expires_at: parse_ts(&row.get::<_, String>(7)?)?,
                            },
                            !revoked && user_enabled && project_enabled,
                        ));
                    }
                    if let Some(role) = row
                        .get::<_, Option<String>>(12)?
                        .and_then(|n| Role::parse(&n))
                    {
                        assigned.push(role);
                    }
                }
                drop(rows);
                let Some((mut info, usable)) = info else {
                    return Ok(None);
                };
                if !usable || assigned.is_empty() {
                    return Ok(None);
                }
                info.caller.roles = effective_roles(&assigned);
                Ok(Some(info))
            })
            .await?;
        match found {
            Some(mut info) if now() < info.expires_at => {
                info.role_ids = role_ids(&self.role_table().await?, &info.caller.roles);
                Ok(info)
            }
            _ => Err(unauthorized()),
        }
    }

    /// NotFound for a token that is not valid (Keystone answers 404 when the subject token of
    /// a validation or revocation is not valid).
    pub async fn revoke_token(&self, caller: &Caller, token: &str) -> ServiceResult<()> {
        let info = self
            .validate_token(token)
            .await
            .map_err(|_| ServiceError::NotFound("Could not find token.".into()))?;
        if info.caller.user_id != caller.user_id && !caller.is_admin() {
            return Err(forbidden("identity:revoke_token"));
        }
        let digest = token_digest(token);
        self.tx(move |conn| {
            conn.execute(
                "UPDATE tokens SET revoked = 1 WHERE token_hash = ?1",
                [digest],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn authenticate_basic(&self, user: &str, password: &str) -> ServiceResult<Caller> {
        let issued = self
            .issue_token(AuthRequest {
                method: AuthMethod::Password {
                    user: UserRef::Name { name: user.into() },
                    password: password.into(),
                },
                scope: None,
            })
            .await?;
        // Basic auth needs no token: forget the one just made.
        let digest = token_digest(&issued.token);
        self.tx(move |conn| {
            conn.execute("DELETE FROM tokens WHERE token_hash = ?1", [digest])?;
            Ok(())
        })
        .await?;
        Ok(issued.info.caller)
    }

    pub async fn list_projects(&self, caller: &Caller) -> ServiceResult<Vec<Project>> {
        need_admin(caller, "identity:list_projects")?;
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {PROJECT_COLS} FROM projects ORDER BY name"
            ))?;
            Ok(stmt
                .query_map([], project_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    pub async fn get_project(&self, caller: &Caller, id_or_name: &str) -> ServiceResult<Project> {
        let key = id_or_name.to_owned();
        let caller = caller.clone();
        self.read(move |conn| {
            let p = find_project(conn, &key)?;
            match p {
                Some(p) if caller.is_admin() || p.id == caller.project_id => Ok(p),
                // A user may see the projects it holds a role on (to choose a scope).
                Some(p) if !assigned_roles(conn, &caller.user_id, &p.id)?.is_empty() => Ok(p),
                _ if !caller.is_admin() => Err(forbidden("identity:get_project").into()),
                _ => Err(not_found("project", &key).into()),
            }
        })
        .await
    }

    pub async fn create_project(&self, caller: &Caller, new: NewProject) -> ServiceResult<Project> {
        need_admin(caller, "identity:create_project")?;
        check_name("project", &new.name)?;
        self.tx(move |conn| {
            if find_by_name(conn, "projects", &new.name)? {
                return Err(conflict("project", &new.name).into());
            }
            let p = Project {
                id: new_id(),
                name: new.name,
                description: new.description,
                enabled: new.enabled,
            };
            conn.execute(
                "INSERT INTO projects (id, name, description, enabled, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![p.id, p.name, p.description, p.enabled, super::ts(now())],
            )?;
            Ok(p)
        })
        .await
    }

    pub async fn delete_project(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        need_admin(caller, "identity:delete_project")?;
        let id = id.to_owned();
        self.tx(move |conn| {
            let Some(p) = find_project(conn, &id)? else {
                return Err(not_found("project", &id).into());
            };
            match conn.execute("DELETE FROM projects WHERE id = ?1", [&p.id]) {
                Ok(_) => keeps_an_admin(conn, "delete project", &p.id),
                // Volumes, servers, images and filesystems keep their project (RESTRICT).
                // SQLite reports a RESTRICT reached while cascading (role assignments, tokens)
                // as SQLITE_CONSTRAINT_TRIGGER, not _FOREIGNKEY: any constraint failure of this
                // delete is a foreign key one.
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(ServiceError::Conflict(format!(
                        "Project {} still owns volumes, servers, images or filesystems; \
                         delete them first.",
                        p.id
                    ))
                    .into())
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    pub async fn list_users(&self, caller: &Caller) -> ServiceResult<Vec<User>> {
        need_admin(caller, "identity:list_users")?;
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {USER_COLS} FROM users ORDER BY name"))?;
            Ok(stmt
                .query_map([], user_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    pub async fn get_user(&self, caller: &Caller, id_or_name: &str) -> ServiceResult<User> {
        let key = id_or_name.to_owned();
        let caller = caller.clone();
        self.read(move |conn| match find_user(conn, &key)? {
            Some(u) if caller.is_admin() || u.id == caller.user_id => Ok(u),
            _ if !caller.is_admin() => Err(forbidden("identity:get_user").into()),
            _ => Err(not_found("user", &key).into()),
        })
        .await
    }

    pub async fn create_user(&self, caller: &Caller, new: NewUser) -> ServiceResult<User> {
        need_admin(caller, "identity:create_user")?;
        check_name("user", &new.name)?;
        let hash = match new.password.clone() {
            Some(p) => Some(
                tokio::task::spawn_blocking(move || hash_password(&p))
                    .await
                    .map_err(|e| ServiceError::Internal(e.to_string()))??,
            ),
            None => None,
        };
        self.tx(move |conn| {
            if find_by_name(conn, "users", &new.name)? {
                return Err(conflict("user", &new.name).into());
            }
            let default_project_id = match &new.default_project_id {
                Some(p) => Some(
                    find_project(conn, p)?
                        .ok_or_else(|| {
                            ServiceError::BadRequest(format!(
                                "default_project_id {p} is not an existing project."
                            ))
                        })?
                        .id,
                ),
                None => None,
            };
            let u = User {
                id: new_id(),
                name: new.name,
                default_project_id,
                enabled: new.enabled,
            };
            conn.execute(
                "INSERT INTO users (id, name, password_hash, default_project_id, enabled, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![u.id, u.name, hash, u.default_project_id, u.enabled, super::ts(now())],
            )?;
            Ok(u)
        })
        .await
    }

    pub async fn delete_user(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        need_admin(caller, "identity:delete_user")?;
        let id = id.to_owned();
        self.tx(move |conn| {
            let Some(u) = find_user(conn, &id)? else {
                return Err(not_found("user", &id).into());
            };
            // Role assignments and tokens go with the user (ON DELETE CASCADE).
            conn.execute("DELETE FROM users WHERE id = ?1", [&u.id])?;
            keeps_an_admin(conn, "delete user", &u.id)
        })
        .await
    }

    pub async fn list_roles(&self, caller: &Caller) -> ServiceResult<Vec<Named>> {
        need_admin(caller, "identity:list_roles")?;
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT id, name FROM roles ORDER BY name")?;
            Ok(stmt
                .query_map([], |r| {
                    Ok(Named {
                        id: r.get(0)?,
                        name: r.get(1)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    pub async fn list_role_assignments(
        &self,
        caller: &Caller,
        project_id: Option<&str>,
        user_id: Option<&str>,
    ) -> ServiceResult<Vec<RoleAssignment>> {
        // Anyone may list their own assignments (Keystone's `list_user_projects` rule).
        if user_id != Some(caller.user_id.as_str()) {
            need_admin(caller, "identity:list_role_assignments")?;
        }
        let project_id = project_id.map(str::to_owned);
        let user_id = user_id.map(str::to_owned);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT a.user_id, a.project_id, r.id, r.name
                 FROM role_assignments a JOIN roles r ON r.id = a.role_id
                 WHERE (?1 IS NULL OR a.project_id = ?1) AND (?2 IS NULL OR a.user_id = ?2)
                 ORDER BY a.project_id, a.user_id, r.name",
            )?;
            Ok(stmt
                .query_map(params![project_id, user_id], |r| {
                    Ok(RoleAssignment {
                        user_id: r.get(0)?,
                        project_id: r.get(1)?,
                        role: Named {
                            id: r.get(2)?,
                            name: r.get(3)?,
                        },
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    pub async fn grant_role(
        &self,
        caller: &Caller,
        project_id: &str,
        user_id: &str,
        role: &str,
    ) -> ServiceResult<()> {
        need_admin(caller, "identity:create_grant")?;
        let (p, u, r) = (project_id.to_owned(), user_id.to_owned(), role.to_owned());
        self.tx(move |conn| {
            let (p, u, r) = resolve_grant(conn, &p, &u, &r)?;
            conn.execute(
                "INSERT OR IGNORE INTO role_assignments (user_id, project_id, role_id)
                 VALUES (?1, ?2, ?3)",
                params![u, p, r],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn revoke_role(
        &self,
        caller: &Caller,
        project_id: &str,
        user_id: &str,
        role: &str,
    ) -> ServiceResult<()> {
        need_admin(caller, "identity:revoke_grant")?;
        let (p, u, r) = (project_id.to_owned(), user_id.to_owned(), role.to_owned());
        self.tx(move |conn| {
            let (p, u, r) = resolve_grant(conn, &p, &u, &r)?;
            let n = conn.execute(
                "DELETE FROM role_assignments WHERE user_id = ?1 AND project_id = ?2 AND role_id = ?3",
                params![u, p, r],
            )?;
            if n == 0 {
                return Err(ServiceError::NotFound(format!(
                    "Could not find role assignment with role: {r}, user or group: {u}, \
                     project, domain, or system: {p}."
                ))
                .into());
            }
            keeps_an_admin(conn, "revoke the role assignment of user", &u)
        })
        .await
    }
}

/// Inside a transaction that removed a project, a user or a role assignment: refuse (and
/// so roll back) if no enabled user is left holding `admin` on an enabled project. Keystone
/// lets an operator lock himself out that way, and cairn has no other way back in than
/// editing the catalog by hand.
fn keeps_an_admin(conn: &Connection, what: &str, id: &str) -> Tx<()> {
    let left: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM role_assignments a
           JOIN roles r ON r.id = a.role_id
           JOIN users u ON u.id = a.user_id
           JOIN projects p ON p.id = a.project_id
          WHERE r.name = 'admin' AND u.enabled = 1 AND p.enabled = 1)",
        [],
        |r| r.get(0),
    )?;
    if left {
        Ok(())
    } else {
        Err(ServiceError::Conflict(format!(
            "Refusing to {what} {id}: no one would be left with the admin role on an enabled \
             project, and nothing could be administered any more. Grant admin to another user \
             first."
        ))
        .into())
    }
}

fn find_user_by_id(conn: &Connection, id: &str) -> Tx<Option<User>> {
    let sql = format!("SELECT {USER_COLS} FROM users WHERE id = ?1 AND enabled = 1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id], user_row)
        .optional()?)
}

fn find_by_name(conn: &Connection, table: &'static str, name: &str) -> Tx<bool> {
    Ok(conn
        .prepare_cached(&format!("SELECT 1 FROM {table} WHERE name = ?1"))?
        .exists([name])?)
}

/// (project id, user id, role id) of a grant, each looked up by id or name.
fn resolve_grant(conn: &Connection, p: &str, u: &str, r: &str) -> Tx<(String, String, String)> {
    let p = find_project(conn, p)?.ok_or_else(|| not_found("project", p))?;
    let u = find_user(conn, u)?.ok_or_else(|| not_found("user", u))?;
    let r = find_role(conn, r)?.ok_or_else(|| not_found("role", r))?;
    Ok((p.id, u.id, r.id))
}

fn conflict(kind: &str, name: &str) -> ServiceError {
    ServiceError::Conflict(format!(
        "Conflict occurred attempting to store {kind} - Duplicate entry found with name {name}."
    ))
}

/// Keystone's limits: 1 to 255 characters (64 for projects), not only blanks.
fn check_name(kind: &str, name: &str) -> ServiceResult<()> {
    let max = if kind == "project" { 64 } else { 255 };
    if name.trim().is_empty() || name.chars().count() > max {
        return Err(ServiceError::BadRequest(format!(
            "Invalid input for field 'name': the {kind} name must be 1 to {max} characters, \
             not only blanks."
        )));
    }
    Ok(())
}

/// A later start on another address (`--http 127.0.0.1:0` picks a new port each time): the
/// `auth_url` of the clouds.yaml cairn wrote follows it. A file cairn did not write (no
/// header of ours) is left alone.
fn refresh_auth_url(path: &Path, public_url: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    if !text.starts_with("# Written by cairn") {
        return Ok(());
    }
    let want = serde_json::to_string(&format!("{public_url}/v3"))?;
    let mut changed = false;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.split_once("auth_url: ") {
            Some((indent, old)) if indent.trim().is_empty() && old != want => {
                out.push_str(&format!("{indent}auth_url: {want}\n"));
                changed = true;
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if changed {
        write_private_atomic(path, &out)?;
    }
    Ok(())
}

/// Writes `path` (mode 0600, atomically: temp file + rename) with one cloud, `cairn`.
fn write_clouds_yaml(
    path: &Path,
    public_url: &str,
    user: &str,
    password: &str,
    project: &str,
) -> anyhow::Result<()> {
    // JSON strings are valid YAML scalars: any password survives quoting.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let text = format!(
        "# Written by cairn on first start. Use with:\n\
         #   OS_CLIENT_CONFIG_FILE={file} openstack --os-cloud {CLOUD_NAME} token issue\n\
         clouds:\n  {CLOUD_NAME}:\n    auth:\n      auth_url: {auth_url}\n      username: {user}\n      \
         password: {password}\n      project_name: {project}\n      user_domain_name: Default\n      \
         project_domain_name: Default\n    region_name: RegionOne\n    interface: public\n    \
         identity_api_version: 3\n",
        file = path.display(),
        auth_url = q(&format!("{public_url}/v3")),
        user = q(user),
        password = q(password),
        project = q(project),
    );
    write_private_atomic(path, &text)
}

/// Writes `text` to `path` with mode 0600, atomically (temp file, fsync, rename).
fn write_private_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", tmp.display()))?;
    // The umask cannot widen 0600, but a pre-set ACL default could: be explicit.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("renaming {} to {}: {e}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_digests() {
        let t = new_token();
        assert_eq!(t.len(), 43);
        assert_ne!(t, new_token());
        let d = token_digest("abc");
        assert_eq!(
            d,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(random_password().len(), 24);
    }

    #[test]
    fn password_hashes_verify() {
        let h = hash_password("s3cret").expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "S3cret"));
        assert!(!verify_password("not a hash", "s3cret"));
    }

    #[test]
    fn implied_roles() {
        assert_eq!(
            effective_roles(&[Role::Admin]),
            vec![Role::Admin, Role::Member, Role::Reader]
        );
        assert_eq!(
            effective_roles(&[Role::Member]),
            vec![Role::Member, Role::Reader]
        );
        assert_eq!(effective_roles(&[]), Vec::<Role>::new());
    }

    #[test]
    fn token_times_sort_as_text() {
        let a = time::macros::datetime!(2026-01-01 00:00:00 UTC);
        let b = a + time::Duration::microseconds(500_000);
        let c = a + time::Duration::seconds(1);
        assert!(token_ts(a) < token_ts(b) && token_ts(b) < token_ts(c));
        assert_eq!(parse_ts(&token_ts(b)).expect("parse"), b);
    }
}
