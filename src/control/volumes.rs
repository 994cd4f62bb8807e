//! The one volume model: volumes, servers and attachments, with their permission rules and
//! status transitions. Store objects are created empty (thin: nothing is allocated until
//! written) and deleted with the volume.

use admin_api::model::*;

use super::Settings;
use crate::{catalog::Catalog, store::Store};

pub struct Volumes {
    pub(crate) catalog: Catalog,
    pub(crate) store: Store,
    pub(crate) settings: Settings,
}

impl Volumes {
    pub fn new(catalog: Catalog, store: Store, settings: Settings) -> Volumes {
        Volumes {
            catalog,
            store,
            settings,
        }
    }

    pub async fn create_volume(&self, caller: &Caller, new: NewVolume) -> ServiceResult<Volume> {
        let _ = (caller, new);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn list_volumes(&self, caller: &Caller, scope: VolumeScope) -> ServiceResult<Vec<Volume>> {
        let _ = (caller, scope);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn get_volume(&self, caller: &Caller, id: &str, pdisk_rules: bool) -> ServiceResult<Volume> {
        let _ = (caller, id, pdisk_rules);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn delete_volume(&self, caller: &Caller, id: &str, pdisk_rules: bool) -> ServiceResult<()> {
        let _ = (caller, id, pdisk_rules);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn create_server(&self, caller: &Caller, new: NewServer) -> ServiceResult<Server> {
        let _ = (caller, new);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn list_servers(&self, caller: &Caller) -> ServiceResult<Vec<Server>> {
        let _ = caller;
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn get_server(&self, caller: &Caller, id: &str) -> ServiceResult<Server> {
        let _ = (caller, id);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn delete_server(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn attach(&self, caller: &Caller, req: AttachRequest) -> ServiceResult<Attachment> {
        let _ = (caller, req);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn detach(&self, caller: &Caller, target: AttachTarget, volume_id: &str, hot_only: bool) -> ServiceResult<Attachment> {
        let _ = (caller, target, volume_id, hot_only);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn detach_all(&self, caller: &Caller, target: AttachTarget) -> ServiceResult<Vec<Attachment>> {
        let _ = (caller, target);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }

    pub async fn list_attachments(&self, caller: &Caller, target: AttachTarget) -> ServiceResult<Vec<Attachment>> {
        let _ = (caller, target);
        Err(ServiceError::Internal("volumes are not implemented yet".into()))
    }
}
