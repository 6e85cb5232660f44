//! Topics: created when missing (unless operators pre-create them), and described for the
//! teams that consume them.

use std::time::Duration;

use ecars_model::RecordInfo;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;

use super::KafkaBus;
use crate::BusError;

/// What another team needs to know about one of our topics.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TopicDescription {
    /// Kafka topic name.
    pub topic: String,
    /// Partitions, as the cluster reports them (`None` when the topic does not exist yet).
    pub partitions: Option<usize>,
    /// What the record key is.
    pub key: &'static str,
    /// CloudEvents `type` header.
    pub event_type: &'static str,
    /// One line on the JSON value.
    pub value: String,
}

impl KafkaBus {
    /// Creates the topics (after the prefix) that do not exist yet.
    pub(crate) async fn create_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        let kafka = |context| move |source| BusError::Kafka { context, source };
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .client_config(&self.brokers)
            .create()
            .map_err(kafka("cannot create an admin client"))?;
        let names: Vec<String> = topics.iter().map(|t| self.config.topic(t)).collect();
        let min_insync = self.config.min_insync_replicas.map(|n| n.to_string());
        let new_topics: Vec<NewTopic> = names
            .iter()
            .map(|name| {
                let topic = NewTopic::new(
                    name,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication_factor),
                );
                match &min_insync {
                    Some(n) => topic.set("min.insync.replicas", n),
                    None => topic,
                }
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(kafka("cannot create topics"))?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(
                    topic,
                    partitions = self.config.partitions,
                    "Kafka topic created"
                ),
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::debug!(topic, "Kafka topic exists")
                }
                Err((topic, code)) => {
                    return Err(BusError::Unavailable(format!(
                        "cannot create Kafka topic {topic}: {code}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Describes these streams' topics, with partition counts read from the cluster.
    pub async fn describe_topics(
        &self,
        streams: &[RecordInfo],
    ) -> Result<Vec<TopicDescription>, BusError> {
        let producer = self.producer.kafka();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Timeout::After(Duration::from_secs(10)))
        })
        .await?
        .map_err(|source| BusError::Kafka {
            context: "cannot read the cluster's metadata",
            source,
        })?;
        let partitions = |name: &str| {
            metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| t.partitions().len())
        };
        Ok(streams
            .iter()
            .map(|info| {
                let topic = self.config.topic(info.topic);
                TopicDescription {
                    partitions: partitions(&topic),
                    topic,
                    key: info.key,
                    event_type: info.event_type,
                    value: info.value_summary(),
                }
            })
            .collect())
    }
}
