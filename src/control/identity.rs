//! Identity: projects, users (argon2-hashed passwords), role assignments and tokens (stored as
//! SHA-256 digests), plus the first-start bootstrap (`admin` project and user, clouds.yaml).

use admin_api::model::*;

use super::Settings;
use crate::catalog::Catalog;

pub struct Identity {
    pub(crate) catalog: Catalog,
    pub(crate) settings: Settings,
}

fn todo_err() -> ServiceError {
    ServiceError::Internal("identity is not implemented yet".into())
}

impl Identity {
    pub fn new(catalog: Catalog, settings: Settings) -> Identity {
        Identity { catalog, settings }
    }

    /// First start (no users yet): domain Default, project `admin`, roles reader/member/admin,
    /// user `admin` (admin on `admin`) with `password` or a random one; writes
    /// `<data-dir>/clouds.yaml` (mode 0600) with cloud `cairn`. Later starts change nothing.
    pub async fn bootstrap(
        &self,
        layout: &crate::config::Layout,
        password: Option<&str>,
    ) -> anyhow::Result<()> {
        let _ = (layout, password);
        Ok(())
    }

    pub async fn issue_token(&self, req: AuthRequest) -> ServiceResult<IssuedToken> {
        let _ = req;
        Err(todo_err())
    }
    pub async fn validate_token(&self, token: &str) -> ServiceResult<TokenInfo> {
        let _ = token;
        Err(todo_err())
    }
    pub async fn revoke_token(&self, caller: &Caller, token: &str) -> ServiceResult<()> {
        let _ = (caller, token);
        Err(todo_err())
    }
    pub async fn authenticate_basic(&self, user: &str, password: &str) -> ServiceResult<Caller> {
        let _ = (user, password);
        Err(todo_err())
    }

    pub async fn list_projects(&self, caller: &Caller) -> ServiceResult<Vec<Project>> {
        let _ = caller;
        Err(todo_err())
    }

    pub async fn get_project(&self, caller: &Caller, id_or_name: &str) -> ServiceResult<Project> {
        let _ = (caller, id_or_name);
        Err(todo_err())
    }

    pub async fn create_project(&self, caller: &Caller, new: NewProject) -> ServiceResult<Project> {
        let _ = (caller, new);
        Err(todo_err())
    }

    pub async fn delete_project(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(todo_err())
    }

    pub async fn list_users(&self, caller: &Caller) -> ServiceResult<Vec<User>> {
        let _ = caller;
        Err(todo_err())
    }

    pub async fn get_user(&self, caller: &Caller, id_or_name: &str) -> ServiceResult<User> {
        let _ = (caller, id_or_name);
        Err(todo_err())
    }

    pub async fn create_user(&self, caller: &Caller, new: NewUser) -> ServiceResult<User> {
        let _ = (caller, new);
        Err(todo_err())
    }

    pub async fn delete_user(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(todo_err())
    }

    pub async fn list_roles(&self, caller: &Caller) -> ServiceResult<Vec<Named>> {
        let _ = caller;
        Err(todo_err())
    }

    pub async fn list_role_assignments(
        &self,
        caller: &Caller,
        project_id: Option<&str>,
        user_id: Option<&str>,
    ) -> ServiceResult<Vec<RoleAssignment>> {
        let _ = (caller, project_id, user_id);
        Err(todo_err())
    }

    pub async fn grant_role(
        &self,
        caller: &Caller,
        project_id: &str,
        user_id: &str,
        role: &str,
    ) -> ServiceResult<()> {
        let _ = (caller, project_id, user_id, role);
        Err(todo_err())
    }

    pub async fn revoke_role(
        &self,
        caller: &Caller,
        project_id: &str,
        user_id: &str,
        role: &str,
    ) -> ServiceResult<()> {
        let _ = (caller, project_id, user_id, role);
        Err(todo_err())
    }
}
