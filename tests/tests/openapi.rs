//! `/v1/openapi.json`: a valid OpenAPI 3.1 document (checked by openapi-spec-validator) that
//! names every route the README lists, whose routes all exist, and whose schemas the live
//! answers of a running `ecars up` composition satisfy (checked by Python's jsonschema).

use std::collections::BTreeSet;
use std::time::Duration;

use ecars_e2e::{publish_v4, reading_json, test_vin, wait_for, Pipeline, PipelineOptions};
use serde_json::Value;

#[tokio::test]
async fn the_openapi_document_is_valid_complete_and_matches_the_answers() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ecars.db").display());
    let pipeline = Pipeline::start(PipelineOptions::new(url)).await.unwrap();
    let vin = test_vin(3);
    let topic = format!("vehicles/{vin}/telemetry");
    let messages = (0..5)
        .map(|i| (topic.clone(), reading_json(&vin, 80.0 - f64::from(i))))
        .chain([(topic.clone(), "{not json".to_owned())])
        .collect();
    publish_v4(pipeline.mqtt_addr, "openapi-car", None, messages)
        .await
        .unwrap();
    wait_for(
        "readings and a dead letter stored",
        Duration::from_secs(10),
        || async {
            pipeline.db.sensor_rows().count().await.unwrap_or(0) == 5
                && pipeline
                    .db
                    .dead_letter_rows()
                    .newest(10)
                    .await
                    .map(|d| d.len())
                    .unwrap_or(0)
                    == 1
                // The car's state, from the persistence worker's next pass.
                && pipeline
                    .db
                    .vehicle_states()
                    .page(&ecars_db::vehicle_states::FleetQuery {
                        limit: 1,
                        ..Default::default()
                    })
                    .await
                    .is_ok_and(|page| !page.is_empty())
        },
    )
    .await
    .unwrap();

    let base = pipeline.http_base();
    let client = reqwest::Client::new();
    let doc: Value = client
        .get(format!("{base}/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    // Every route the README's HTTP tables list is in the document, and no other.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let listed: BTreeSet<(String, String)> = readme
        .lines()
        .filter(|l| l.starts_with("| `GET /") || l.starts_with("| `POST /"))
        .flat_map(|l| {
            let cell = l.split('|').nth(1).unwrap_or_default();
            cell.split(", ")
                .map(|route| {
                    let route = route.trim().trim_matches('`');
                    let (method, path) = route.split_once(' ').unwrap();
                    let path = path.split('?').next().unwrap();
                    (method.to_lowercase(), path.to_owned())
                })
                .collect::<Vec<_>>()
        })
        .filter(|(_, path)| path != "/")
        .collect();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "post", "put", "delete", "patch"].contains(&k.as_str()))
                .map(|method| (method.clone(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(listed, documented, "README routes vs documented routes");

    // Each documented public route exists (the fallback answers 404 "no such resource"); the
    // internal ones exist on the admin listener.
    for (method, path) in &documented {
        let internal = ["/healthz", "/readyz", "/metrics"].contains(&path.as_str());
        let url = format!(
            "{}{}",
            if internal {
                pipeline.admin_base()
            } else {
                base.clone()
            },
            path.replace("{vin}", vin.as_str())
                .replace("{key}", "no-such-key")
        );
        let request = match method.as_str() {
            "post" => client.post(&url).json(&serde_json::json!({ "vin": vin })),
            _ => client.get(&url),
        };
        let response = request.send().await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert!(
            !(status == 404 && body.contains("no such resource")),
            "{method} {path} is documented but not routed"
        );
    }

    // The answers satisfy the schemas the document gives them.
    let answers = [
        ("VehiclePage", format!("{base}/v1/vehicles")),
        ("Readings", format!("{base}/v1/vehicles/{vin}/telemetry")),
        ("History", format!("{base}/v1/vehicles/{vin}/history")),
        (
            "History",
            format!("{base}/v1/vehicles/{vin}/history?resolution=1m"),
        ),
        (
            "History",
            format!("{base}/v1/vehicles/{vin}/history?resolution=1h"),
        ),
        ("DeadLetters", format!("{base}/v1/dead-letters")),
        ("CasesPage", format!("{base}/v1/cases")),
        ("ErrorBody", format!("{base}/v1/vehicles?limit=0")),
        ("ServiceStatus", format!("{base}/v1/status")),
    ];
    let doc_path = dir.path().join("openapi.json");
    std::fs::write(&doc_path, serde_json::to_vec(&doc).unwrap()).unwrap();
    let mut args = vec![
        concat!(env!("CARGO_MANIFEST_DIR"), "/python/check_openapi.py").to_owned(),
        doc_path.display().to_string(),
    ];
    for (i, (schema, url)) in answers.iter().enumerate() {
        let answer: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        // Not vacuous: each answer has content to check.
        assert!(
            answer.as_array().is_none_or(|a| !a.is_empty()),
            "{url} answered an empty list"
        );
        let path = dir.path().join(format!("answer-{i}.json"));
        std::fs::write(&path, serde_json::to_vec(&answer).unwrap()).unwrap();
        args.push((*schema).to_owned());
        args.push(path.display().to_string());
    }
    let out = tokio::process::Command::new("python3")
        .args(&args)
        .output()
        .await
        .expect("python3 runs (the test command installs openapi-spec-validator)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // And the checker can fail: an answer that breaks its schema is caught.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, br#"[{"vin": 42}]"#).unwrap();
    let out = tokio::process::Command::new("python3")
        .args([
            &args[0],
            &args[1],
            "VehiclePage",
            &bad.display().to_string(),
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "a wrong answer must fail the check");
    pipeline.shutdown().await.unwrap();
}
