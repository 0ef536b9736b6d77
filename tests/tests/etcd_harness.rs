//! The harness's etcd starts inside a namespace, survives a stop/resume with its data, and
//! leaves nothing behind.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
};

use weft_tests::{etcd::Etcd, netns::Netns};

fn get_version(ns: &Netns, etcd: &Etcd) -> String {
    let addr = (etcd.ip, etcd.port);
    ns.run(move || {
        let mut s = TcpStream::connect(addr).expect("connecting to etcd");
        s.write_all(b"GET /version HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

#[test]
fn etcd_runs_inside_a_namespace_and_restarts() {
    let ns = Netns::new("etcd");
    let mut etcd = Etcd::start(&ns, Ipv4Addr::new(127, 0, 0, 1), 23790);
    assert!(get_version(&ns, &etcd).contains("etcdserver"));
    etcd.put("/weft-test/a", "1");
    etcd.stop();
    assert!(
        ns.run(|| TcpStream::connect(("127.0.0.1", 23790)).is_err()),
        "stopped"
    );
    etcd.resume();
    assert!(get_version(&ns, &etcd).contains("etcdserver"));
    // Data written before the outage survived it.
    etcd.put("/weft-test/b", "{\"x\":2}");
    etcd.put("/other/c", "3");
    let kvs = etcd.get_prefix("/weft-test/");
    assert_eq!(
        kvs,
        vec![
            ("/weft-test/a".to_string(), "1".to_string()),
            ("/weft-test/b".to_string(), "{\"x\":2}".to_string())
        ]
    );
}
