//! The throwaway PostgreSQL server of a test run and fresh databases on it.

/// The throwaway PostgreSQL server of this test run (`scripts/pg-throwaway` starts one; the
/// README's test command and CI do it for you).
pub fn pg_server() -> String {
    std::env::var("FERRY_TEST_PG").unwrap_or_else(|_| {
        panic!(
            "FERRY_TEST_PG is not set: these tests need a PostgreSQL server. Run scripts/test-all, \
             or `eval \"$(scripts/pg-throwaway start)\"` first"
        )
    })
}

/// A new, empty database on the test server; returns its URL.
pub fn fresh_pg_db() -> String {
    let server = pg_server();
    let name = format!(
        "ferry_{}",
        ulid::Ulid::generate().to_string().to_lowercase()
    );
    let url = server.clone();
    let create = name.clone();
    // On its own thread: callers may be inside a runtime already.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let server = url;
            let name = create;
            let (client, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to FERRY_TEST_PG={server}: {e}"));
            let driver = tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
            drop(client);
            let _ = driver.await;
        });
    })
    .join()
    .unwrap();
    match server.rfind('/') {
        Some(i) if i > "postgres://".len() => format!("{}/{name}", &server[..i]),
        _ => format!("{server}/{name}"),
    }
}
