//! Agents program a datapath that forwards: pods (created by the CNI plugin) on two
//! agent-managed nodes reach each other and the nodes, and a ping flow across a SIGKILL and
//! restart of one agent loses nothing.
use std::{process::Command, time::Duration};

use serde_json::json;
use weft_tests::cluster::Cluster;

fn ping(from: &weft_tests::netns::Netns, to: std::net::Ipv4Addr) {
    from.exec(
        "ping",
        &["-c", "2", "-i", "0.2", "-W", "2", &to.to_string()],
    );
}

#[test]
fn agent_programmed_nodes_forward_and_restart_loses_nothing() {
    let mut c = Cluster::agents(
        2,
        json!({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}),
        10,
    );
    c.wait_all_converged(Duration::from_secs(40));
    c.add_pod(0);
    c.add_pod(1);
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    ping(&a.ns, b.ip);
    ping(&b.ns, a.ip);
    ping(&c.nodes[0].ns, b.ip); // node -> remote pod through weft_host
    ping(&a.ns, c.nodes[1].ip); // pod -> remote node
    // Large packets at the pod MTU cross without fragmentation.
    a.ns.exec(
        "ping",
        &[
            "-c",
            "2",
            "-M",
            "do",
            "-s",
            "1422",
            "-W",
            "2",
            &b.ip.to_string(),
        ],
    );

    // 300 pings 10 ms apart while node 0's agent is killed and restarted.
    let (pod_ns, to) = (a.ns.name.clone(), b.ip);
    let flow = {
        let ns = pod_ns;
        let to = to.to_string();
        std::thread::spawn(move || {
            Command::new("ip")
                .args([
                    "netns", "exec", &ns, "ping", "-c", "300", "-i", "0.01", "-W", "1", &to,
                ])
                .output()
                .expect("ping")
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.restart_agent(0);
    let out = flow.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("300 packets transmitted, 300 received"),
        "packets lost across the agent restart: {text}\n{}",
        c.agent_logs()
    );
    weft_tests::process::wait_until("restarted agent ready", Duration::from_secs(30), || {
        c.nodes[0].http_get("/readyz").is_some_and(|r| r.0 == 200)
    });
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    ping(&a.ns, b.ip);
}
