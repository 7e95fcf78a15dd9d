"""Tests for gunicorn_llm/request_schema.py: the `/infer` body contract, through `parse_infer_request` only."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gunicorn_llm.request_schema import RequestError, SamplingParams, parse_infer_request

pytestmark = pytest.mark.inprocess

# vLLM's SamplingParams defaults (vllm.SamplingParams signature, e.g. v0.8.3) for every field this server knows.
VLLM_DEFAULTS = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "seed": None,
    "stop": None,
    "stop_token_ids": None,
    "ignore_eos": False,
    "max_tokens": 16,
    "logprobs": None,
    "prompt_logprobs": None,
    "skip_special_tokens": True,
    "structured_outputs": None,
    "logit_bias": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "min_tokens": 0,
}


def parse_params(**params):
    """The validated params of a one-instance request carrying `params`."""
    request, _ = parse_infer_request({"instances": ["Hello"], "params": params})
    return request.params


def error_of(body) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_infer_request(body)
    return caught.value


def params_error(**params) -> RequestError:
    return error_of({"instances": ["Hello"], "params": params})


# ---------------------------------------------------------------------------------------------------------------
# Valid requests


def test_instances_come_back_in_order():
    request, unknown = parse_infer_request({"instances": ["a", "b", "c"]})
    assert request.instances == ["a", "b", "c"]
    assert unknown == {}


def test_defaults_equal_vllm_sampling_params_defaults():
    request, _ = parse_infer_request({"instances": ["Hello"]})
    assert request.params.model_dump() == VLLM_DEFAULTS


def test_empty_params_object_gives_the_same_defaults():
    assert parse_params() == SamplingParams()
    assert parse_params().model_dump() == VLLM_DEFAULTS


def test_given_values_are_kept():
    params = parse_params(n=3, temperature=0.5, top_p=0.9, top_k=40, max_tokens=100, seed=7, ignore_eos=True)
    assert (params.n, params.temperature, params.top_p, params.top_k) == (3, 0.5, 0.9, 40)
    assert (params.max_tokens, params.seed, params.ignore_eos) == (100, 7, True)


def test_integer_json_number_is_accepted_for_a_float_param():
    params = parse_params(temperature=0, top_p=1)
    assert params.temperature == 0.0 and params.is_greedy
    assert params.top_p == 1.0


def test_unknown_params_are_reported_with_their_values_and_dropped():
    # UltraEval's own key, and vLLM's older best_of at its default (route: refused where it asks for something)
    request, unknown = parse_infer_request(
        {"instances": ["Hello"], "params": {"temperature": 0.5, "sampling_num": 3, "best_of": 1}}
    )
    assert unknown == {"sampling_num": 3, "best_of": 1}
    assert request.params.temperature == 0.5
    assert "sampling_num" not in request.params.model_dump() and "best_of" not in request.params.model_dump()


def test_max_new_tokens_is_max_tokens():
    # UltraEval's transformers server took transformers' name for it
    assert parse_params(max_new_tokens=3).max_tokens == 3
    assert parse_params(max_new_tokens=3, max_tokens=3).max_tokens == 3
    error = params_error(max_new_tokens=3, max_tokens=5)
    assert error.param == "params.max_new_tokens" and "differs from max_tokens 5" in error.message


def test_do_sample_false_is_greedy_and_true_samples():
    assert parse_params(do_sample=False).is_greedy
    assert parse_params(do_sample=False, temperature=0.7).is_greedy  # as transformers' generate() decodes
    assert parse_params(do_sample=True, temperature=0.7).temperature == 0.7
    assert parse_params(do_sample=True).temperature == 1.0
    error = params_error(do_sample=True, temperature=0)
    assert error.param == "params.do_sample" and "temperature 0 is greedy" in error.message
    # below vLLM's epsilon a temperature is greedy too (the field's own rule): no silent greedy answer either
    assert params_error(do_sample=True, temperature=1e-6).param == "params.do_sample"
    assert params_error(do_sample=True, temperature="hot").param == "params.temperature"  # the field's own error
    assert params_error(do_sample="no").param == "params.do_sample"


def test_unknown_top_level_keys_are_ignored():
    request, unknown = parse_infer_request({"instances": ["Hello"], "model": "whatever"})
    assert request.instances == ["Hello"]
    assert unknown == {}


def test_one_stop_string_becomes_a_tuple():
    assert parse_params(stop="\n\n").stop == ("\n\n",)


def test_a_stop_list_becomes_a_tuple():
    assert parse_params(stop=["a", "b"]).stop == ("a", "b")


def test_stop_token_ids_list_becomes_a_tuple():
    assert parse_params(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)


def test_equal_params_are_equal_and_hash_equal():
    first = parse_params(temperature=0.5, stop=["x"], stop_token_ids=[3])
    second = parse_params(stop="x", temperature=0.5, stop_token_ids=[3])
    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1  # one batching key


def test_an_integer_and_a_float_spelling_hash_equal():
    assert hash(parse_params(temperature=1)) == hash(parse_params(temperature=1.0))


def test_different_params_are_different_keys():
    assert parse_params(temperature=0.5) != parse_params(temperature=0.6)
    assert len({parse_params(max_tokens=5), parse_params(max_tokens=6)}) == 2


def test_params_are_immutable():
    params = parse_params()
    with pytest.raises(ValidationError):
        params.temperature = 0.0  # a batching key must not change after it was used


# ---------------------------------------------------------------------------------------------------------------
# Wrong types: RequestError naming the field


def test_a_string_temperature_names_params_temperature():
    error = params_error(temperature="hot")
    assert error.param == "params.temperature"
    assert "params.temperature" in str(error)


@pytest.mark.parametrize("value", [1.5, True, "16"], ids=["float", "bool", "string"])
def test_a_non_integer_max_tokens_names_params_max_tokens(value):
    assert params_error(max_tokens=value).param == "params.max_tokens"


def test_a_bool_temperature_is_refused():
    assert params_error(temperature=True).param == "params.temperature"


def test_a_string_for_skip_special_tokens_is_refused():
    assert params_error(skip_special_tokens="yes").param == "params.skip_special_tokens"


def test_instances_as_a_string_names_instances():
    error = error_of({"instances": "Hello"})
    assert error.param == "instances"


def test_a_number_in_instances_names_its_index():
    assert error_of({"instances": [42]}).param == "instances.0"
    assert error_of({"instances": ["ok", None]}).param == "instances.1"


def test_an_empty_instance_string_names_its_index():
    assert error_of({"instances": ["ok", ""]}).param == "instances.1"


def test_missing_instances_names_instances():
    error = error_of({"params": {}})
    assert error.param == "instances"
    assert "required" in error.message


def test_params_not_an_object_names_params():
    assert error_of({"instances": ["Hello"], "params": ["temperature", 0]}).param == "params"


def test_empty_stop_string_is_refused():
    assert params_error(stop=["ok", ""]).param == "params.stop"


# ---------------------------------------------------------------------------------------------------------------
# Out of range


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_p", 0),
        ("top_p", 1.5),
        ("n", 0),
        ("temperature", -1),
        ("max_tokens", 0),
        ("top_k", -2),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("presence_penalty", 2.5),
        ("seed", -1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
    ],
)
def test_out_of_range_value_names_the_field(field, value):
    error = params_error(**{field: value})
    assert error.param == f"params.{field}"
    assert f"params.{field}" in error.message


def test_empty_instances_list_is_refused():
    error = error_of({"instances": []})
    assert error.param == "instances"


# ---------------------------------------------------------------------------------------------------------------
# Body not an object


@pytest.mark.parametrize("body", [["Hello"], None, "Hello", 3], ids=["list", "null", "string", "number"])
def test_a_body_that_is_not_an_object_is_refused(body):
    error = error_of(body)
    assert error.param is None  # no field to name: the whole body is wrong
    assert error.message == "the body must be a JSON object with 'instances' and 'params'"


def test_null_params_means_the_defaults():
    request, unknown = parse_infer_request({"instances": ["Hello"], "params": None})
    assert request.params == SamplingParams() and unknown == {}


def test_logit_bias_is_kept_as_sorted_pairs_and_an_empty_one_is_none():
    params = parse_params(logit_bias={"7": -100, "3": 2.5, "11": 0})
    assert params.logit_bias == ((3, 2.5), (7, -100.0), (11, 0.0))
    assert params == parse_params(logit_bias={"11": 0, "3": 2.5, "7": -100})  # equal requests batch together
    assert parse_params(logit_bias={}) == SamplingParams()


def test_token_controls_are_kept_and_said_to_be_asked_for():
    params = parse_params(allowed_token_ids=[5, 3], bad_words=["a", "b", "a"], min_tokens=3)
    assert params.allowed_token_ids == (5, 3) and params.bad_words == ("a", "b") and params.min_tokens == 3
    assert params.controls_tokens and not SamplingParams().controls_tokens
    assert parse_params(bad_words=[]) == SamplingParams()


@pytest.mark.parametrize(("params", "param"), [
    ({"logit_bias": {"x": 1}}, "params.logit_bias"),
    ({"logit_bias": {"-1": 1}}, "params.logit_bias"),
    ({"logit_bias": {"1": -100.5}}, "params.logit_bias"),
    ({"logit_bias": {"1": "5"}}, "params.logit_bias"),
    ({"logit_bias": [[1, 5]]}, "params.logit_bias"),
    ({"allowed_token_ids": []}, "params.allowed_token_ids"),
    ({"allowed_token_ids": [1, -2]}, "params.allowed_token_ids.1"),
    ({"bad_words": "Paris"}, "params.bad_words"),
    ({"bad_words": ["ok", ""]}, "params.bad_words.1"),
    ({"bad_words": [{}]}, "params.bad_words.0"),  # not a 500 (an unhashable word, found by the fuzz test)
    ({"min_tokens": -1}, "params.min_tokens"),
    ({"min_tokens": 17}, "params.min_tokens"),  # above max_tokens' default, 16
    ({"min_tokens": 5, "max_tokens": 4}, "params.min_tokens"),
])
def test_token_controls_out_of_range_name_the_field(params, param):
    error = params_error(**params)
    assert error.param == param and param in error.message


def test_empty_stop_list_is_the_same_request_as_no_stop():
    request, _ = parse_infer_request({"instances": ["Hello"], "params": {"stop": []}})
    assert request.params.stop is None
    assert request.params == SamplingParams()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused_as_such(value):
    error = params_error(temperature=value)
    assert error.param == "params.temperature"
    assert "finite" in error.message
