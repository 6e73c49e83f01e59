//! `portrait.v1.Profiles`.

use std::net::SocketAddr;
use std::sync::Arc;

use portrait_proto::v1::profiles_server::Profiles;
use portrait_proto::v1::{
    BatchGetProfilesRequest, BatchGetProfilesResponse, GetProfileRequest, GetProfileResponse,
};
use tonic::{Request, Response, Status};

use super::convert::{consistency_from_pb, profile_to_pb, read_info_to_pb};
use super::sending::SendBudget;
use crate::error::Error;
use crate::limits::MAX_BATCH_GET_USERS;
use crate::node::Node;
use crate::store::read::Selection;
use crate::validate::validate_user_id;

pub struct ProfilesService {
    node: Arc<Node>,
    /// The node's bound on responses not yet taken by their readers.
    sending: Arc<SendBudget>,
}

impl ProfilesService {
    pub fn new(node: Arc<Node>, sending: Arc<SendBudget>) -> Self {
        ProfilesService { node, sending }
    }

    /// `message` as the answer to the connection from `peer`, holding its
    /// encoded size of the node's [`SendBudget`] (and of the connection's
    /// share) until its reader took it (`service::sending`), or UNAVAILABLE
    /// when that would pass either.
    fn answer<M: prost::Message>(&self, message: M, peer: Option<SocketAddr>) -> Result<Response<M>, Status> {
        let hold = self.sending.take(message.encoded_len(), peer)?;
        let mut response = Response::new(message);
        response.extensions_mut().insert(hold);
        Ok(response)
    }
}

#[tonic::async_trait]
impl Profiles for ProfilesService {
    async fn get_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<GetProfileResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let consistency = consistency_from_pb(req.consistency)?;
        validate_user_id(&req.user_id).map_err(Error::from)?;
        self.sending.has_room(peer)?;
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
        let profile = Some(profile_to_pb(user_id, view));
        self.answer(GetProfileResponse { profile, read_info: Some(read_info_to_pb(info)) }, peer)
    }

    async fn batch_get_profiles(
        &self,
        request: Request<BatchGetProfilesRequest>,
    ) -> Result<Response<BatchGetProfilesResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        if req.user_ids.len() > MAX_BATCH_GET_USERS {
            let reason = format!("{} users is over the limit of {MAX_BATCH_GET_USERS}", req.user_ids.len());
            return Err(Error::invalid("user_ids", reason).into());
        }
        let consistency = consistency_from_pb(req.consistency)?;
        self.sending.has_room(peer)?;
        let selection = Selection::from_lists(req.families, req.features, req.tags);
        let (views, info) = self.node.read_profiles(&req.user_ids, selection, consistency).await?;
        let profiles = req.user_ids.into_iter().zip(views).map(|(u, v)| profile_to_pb(u, v)).collect();
        self.answer(BatchGetProfilesResponse { profiles, read_info: Some(read_info_to_pb(info)) }, peer)
    }
}
