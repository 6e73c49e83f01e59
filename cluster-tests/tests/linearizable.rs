//! Linearizability of a register across a leader failover, on real
//! processes: concurrent clients write and linearizably read one user's
//! attribute while the leader is SIGKILLed; the recorded history is checked
//! with the WGL checker in `portrait_cluster_tests::linearizability`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portrait_client::portrait_proto::ValueKind;
use portrait_client::{Consistency, Event, PortraitClient, Value};
use portrait_cluster_tests::linearizability::{is_linearizable, Call, Op};
use portrait_cluster_tests::Cluster;

/// Every write has the same event time, so the latest *applied* write wins:
/// the attribute behaves as a register in log order.
const TIME: i64 = 1_790_000_000_000;
const CLIENTS: i64 = 3;
const OPS_PER_CLIENT: i64 = 24;

fn write(v: i64) -> Event {
    Event {
        user_id: "reg".into(),
        family: "registration".into(),
        r#type: "set".into(),
        event_time_ms: TIME,
        event_id: format!("set-{v}"),
        attrs: [("v".to_string(), Value::int(v))].into(),
    }
}

async fn read(client: &PortraitClient) -> Result<Option<i64>, ()> {
    match client.get_profile("reg", &["registration".into()], Consistency::Linearizable).await {
        Ok(r) => {
            let p = r.profile.unwrap_or_default();
            let v =
                p.families.get("registration").and_then(|f| f.attrs.get("v")).and_then(|a| a.value.clone());
            Ok(v.and_then(|v| match v.kind {
                Some(ValueKind::IntValue(i)) => Some(i),
                _ => None,
            }))
        }
        Err(e) if e.code().map(portrait_client::code_name) == Some("NOT_FOUND") => Ok(None),
        Err(_) => Err(()),
    }
}

async fn client_loop(c: u64, endpoints: Vec<String>, start: Instant, history: Arc<Mutex<Vec<Call>>>) {
    let client = PortraitClient::connect(&endpoints[(c as usize) % endpoints.len()]).await.unwrap();
    let t = || start.elapsed().as_micros() as u64;
    for i in 0..OPS_PER_CLIENT {
        let invoked = t();
        let call = if (i + c as i64) % 2 == 0 {
            let v = c as i64 * 1000 + i;
            let ok = tokio::time::timeout(Duration::from_secs(5), client.write(vec![write(v)])).await;
            let returned = matches!(ok, Ok(Ok(_))).then(t);
            Call { op: Op::Write(v), invoked, returned }
        } else {
            match tokio::time::timeout(Duration::from_secs(5), read(&client)).await {
                Ok(Ok(v)) => Call { op: Op::Read(v), invoked, returned: Some(t()) },
                _ => Call { op: Op::Read(None), invoked, returned: None },
            }
        };
        history.lock().unwrap().push(call);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_register_stays_linearizable_across_a_leader_kill() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.wait_leader(&[1, 2, 3]).await;
    // Clients start on the followers (a client has one seed endpoint); their
    // writes are redirected to the leader, which is then killed.
    let endpoints: Vec<String> =
        (1..=3).filter(|&id| id != leader).map(|id| cluster.node(id).endpoint()).collect();
    let history = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS as u64)
        .map(|c| tokio::spawn(client_loop(c, endpoints.clone(), start, history.clone())))
        .collect();

    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.kill(leader);
    let killed_at = start.elapsed().as_micros() as u64;
    for t in tasks {
        t.await.unwrap();
    }
    let history = history.lock().unwrap().clone();
    let completed = history.iter().filter(|c| c.returned.is_some()).count();
    assert!(completed >= history.len() / 2, "most operations completed: {completed}/{}", history.len());
    let after_kill = history.iter().filter(|c| c.invoked > killed_at && c.returned.is_some()).count();
    assert!(after_kill > 0, "some operations completed after the leader was killed");
    assert!(is_linearizable(&history), "not linearizable: {history:#?}");
}
