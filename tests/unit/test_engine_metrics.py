"""Reading an engine's load from its Prometheus /metrics page, as vLLM serves it."""

from __future__ import annotations

from services.worker.engines.openai_server import load_from_metrics, parse_metrics
from shared import schema

VLLM_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1.2345e+04
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4375
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="x"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="x"} 17.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="x"} 17.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="x"} 1.25
"""

OLDER_VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="x"} 1.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="x"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="x"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="x"} 0.125
"""


def test_current_vllm_metrics_give_running_waiting_and_kv_usage():
    load = load_from_metrics(parse_metrics(VLLM_METRICS))
    assert load == schema.EngineLoad(running=3, waiting=2, kv_cache_usage=0.4375)


def test_older_vllm_gpu_cache_metric_is_understood():
    load = load_from_metrics(parse_metrics(OLDER_VLLM_METRICS))
    assert load == schema.EngineLoad(running=1, waiting=0, kv_cache_usage=0.125)


def test_comment_lines_are_ignored_and_labels_stripped_from_names():
    values = parse_metrics(VLLM_METRICS)
    assert not any(name.startswith("#") or "{" in name for name in values)
    assert values["python_gc_objects_collected_total"] == 12345.0
    assert values["vllm:time_to_first_token_seconds_sum"] == 1.25


def test_label_sets_of_one_metric_are_summed():
    text = (
        'vllm:num_requests_running{engine="0",model_name="x"} 2\n'
        'vllm:num_requests_running{engine="1",model_name="x"} 5\n'
    )
    assert parse_metrics(text)["vllm:num_requests_running"] == 7.0


def test_cache_usage_of_several_engines_is_the_fullest_not_the_sum():
    text = 'vllm:kv_cache_usage_perc{engine="0"} 0.5\nvllm:kv_cache_usage_perc{engine="1"} 0.75\n'
    assert load_from_metrics(parse_metrics(text)).kv_cache_usage == 0.75


def test_a_sample_with_a_timestamp_parses():
    assert parse_metrics("vllm:num_requests_waiting 3 1700000000000\n") == {"vllm:num_requests_waiting": 3.0}


def test_metrics_without_labels_parse():
    assert parse_metrics("vllm:num_requests_waiting 4\n") == {"vllm:num_requests_waiting": 4.0}


def test_label_values_with_spaces_and_commas_parse():
    text = 'vllm:num_requests_running{model_name="my model, v2"} 6\n'
    assert parse_metrics(text) == {"vllm:num_requests_running": 6.0}


def test_nan_and_garbage_lines_are_skipped():
    values = parse_metrics("g NaN\nnot a metric line at all\n\nh 1e-3\nneg -4\nbig 1e400\n")
    assert values == {"h": 0.001}


def test_nan_or_negative_engine_figures_never_reach_a_heartbeat():
    """A NaN gauge once made int() raise inside the heartbeat loop, which then died for good."""
    text = "vllm:num_requests_running NaN\nvllm:num_requests_waiting -1\nvllm:kv_cache_usage_perc 7\n"
    load = load_from_metrics(parse_metrics(text))
    assert load == schema.EngineLoad(kv_cache_usage=1.0)
    schema.heartbeat_decoder.decode(
        schema.encode(schema.Heartbeat("w", "c", "m", "ready", 1, 0, 1.0, engine=load))
    )  # and what is sent decodes under the wire constraints


def test_an_engine_without_vllm_metrics_reports_nothing():
    load = load_from_metrics(parse_metrics("# HELP llamacpp:tokens_predicted_total x\nother_metric 1\n"))
    assert load == schema.EngineLoad()


def test_kv_cache_prefers_the_current_metric_name_when_both_appear():
    text = "vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.2\n"
    assert load_from_metrics(parse_metrics(text)).kv_cache_usage == 0.2


def test_float_counts_become_whole_numbers():
    load = load_from_metrics({"vllm:num_requests_running": 2.0, "vllm:num_requests_waiting": 0.0})
    assert (load.running, load.waiting) == (2, 0)
    assert isinstance(load.running, int)
