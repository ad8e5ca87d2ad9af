//! The Redis Cluster harness against real redis-servers: the keys a client sets through one node are spread over
//! the masters and read back through another, and a node killed and restarted rejoins the cluster.

use std::time::Duration;

use testkit::RedisCluster;

/// Runs `redis-cli -c` (following the cluster's redirections) against the node on `port`; its answer.
async fn redis_cli(port: u16, args: &[&str]) -> String {
    let mut command = tokio::process::Command::new("redis-cli");
    command
        .args(["-c", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(10), command.output())
        .await
        .expect("redis-cli answers within 10 s")
        .expect("redis-cli runs");
    assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn a_three_master_cluster_spreads_keys_and_survives_a_node_restart() {
    let mut cluster = RedisCluster::start(3).await;
    let ports = cluster.ports();
    assert_eq!(
        cluster.urls(),
        ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
    );
    let keys: Vec<String> = (0..10).map(|i| format!("key-{i}")).collect();
    for key in &keys {
        assert_eq!(
            redis_cli(ports[0], &["set", key, &format!("value of {key}")]).await,
            "OK"
        );
    }
    for key in &keys {
        assert_eq!(redis_cli(ports[2], &["get", key]).await, format!("value of {key}"));
    }
    let mut held = Vec::new();
    for &port in &ports {
        held.push(redis_cli(port, &["dbsize"]).await.parse::<usize>().unwrap());
    }
    assert_eq!(
        held.iter().sum::<usize>(),
        keys.len(),
        "each key is on one master: {held:?}"
    );
    assert!(
        held.iter().filter(|&&n| n > 0).count() >= 2,
        "the keys are spread over the masters: {held:?}"
    );

    cluster.kill(1).await;
    cluster.restart(1).await;
    assert!(
        redis_cli(ports[1], &["cluster", "info"])
            .await
            .contains("cluster_state:ok")
    );
    for key in &keys {
        assert_eq!(redis_cli(ports[1], &["set", key, "again"]).await, "OK");
        assert_eq!(redis_cli(ports[0], &["get", key]).await, "again");
    }
}
