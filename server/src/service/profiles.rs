//! `portrait.v1.Profiles`.

use std::sync::Arc;

use portrait_proto::v1::profiles_server::Profiles;
use portrait_proto::v1::{
    BatchGetProfilesRequest, BatchGetProfilesResponse, GetProfileRequest, GetProfileResponse,
};
use tonic::{Request, Response, Status};

use super::convert::{consistency_from_pb, profile_to_pb, read_info_to_pb};
use crate::error::Error;
use crate::limits::MAX_BATCH_GET_USERS;
use crate::node::Node;
use crate::store::read::Selection;
use crate::validate::validate_user_id;

pub struct ProfilesService {
    node: Arc<Node>,
}

impl ProfilesService {
    pub fn new(node: Arc<Node>) -> Self {
        ProfilesService { node }
    }
}

#[tonic::async_trait]
impl Profiles for ProfilesService {
    async fn get_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<GetProfileResponse>, Status> {
        let req = request.into_inner();
        let consistency = consistency_from_pb(req.consistency)?;
        validate_user_id(&req.user_id).map_err(Error::from)?;
        let users = [req.user_id];
        let (mut views, info) = self
            .node
            .read_profiles(&users, Selection::from_lists(req.families, req.features, req.tags), consistency)
            .await
            .map_err(|e| match e {
                // The request has one user: its field, not a batch's.
                Error::InvalidArgument { field, reason } if field == "user_ids" => {
                    Error::invalid("user_id", reason.replace(" (at user 1 of 1)", ""))
                }
                other => other,
            })?;
        let [user_id] = users;
        let view = views.pop().expect("one view per user");
        if !view.found {
            let shown = crate::validate::shown(&user_id);
            return Err(Error::NotFound(format!("user {shown} has no profile")).into());
        }
        Ok(Response::new(GetProfileResponse {
            profile: Some(profile_to_pb(user_id, view)),
            read_info: Some(read_info_to_pb(info)),
        }))
    }

    async fn batch_get_profiles(
        &self,
        request: Request<BatchGetProfilesRequest>,
    ) -> Result<Response<BatchGetProfilesResponse>, Status> {
        let req = request.into_inner();
        if req.user_ids.len() > MAX_BATCH_GET_USERS {
            let reason = format!("{} users is over the limit of {MAX_BATCH_GET_USERS}", req.user_ids.len());
            return Err(Error::invalid("user_ids", reason).into());
        }
        let consistency = consistency_from_pb(req.consistency)?;
        let selection = Selection::from_lists(req.families, req.features, req.tags);
        let (views, info) = self.node.read_profiles(&req.user_ids, selection, consistency).await?;
        let profiles = req.user_ids.into_iter().zip(views).map(|(u, v)| profile_to_pb(u, v)).collect();
        Ok(Response::new(BatchGetProfilesResponse { profiles, read_info: Some(read_info_to_pb(info)) }))
    }
}
