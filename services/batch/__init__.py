"""The batch service: the OpenAI Files and Batch APIs on a JetStream work queue, with webhooks."""
