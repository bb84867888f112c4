"""Chat templates and assistant-only loss masks that are right by construction, or an error.

    template.py   which template a run uses (--chat_template, the model's own, ChatML), its variables
                  (--chat_template_kwargs), and rendering with both
    turns.py      where each assistant turn's trained text lies in the rendering: the template's {% generation %}
                  markers, else the turns located structurally (linear in the turns, else prefix by prefix)
    encoding.py   a conversation's token ids and labels (-100 outside the trained turns), the prompt a model
                  answers from, and the ids that end an answer
"""

from .encoding import IGNORE_INDEX, Encoded, encode, encode_prompt, end_of_turn_ids
from .template import (TEMPLATE_KWARGS, TEMPLATE_KWARGS_HELP, chatml_template, parse_template_kwargs, render,
                       resolve_chat_template, set_template_kwargs, template_kwargs, template_kwargs_problem)
from .turns import (Rendered, Span, _linear_spans, _special_strings, assistant_spans, locate_turns, model_name,
                    prefix_spans)

__all__ = ["IGNORE_INDEX", "TEMPLATE_KWARGS", "TEMPLATE_KWARGS_HELP", "Encoded", "Rendered", "Span", "_linear_spans",
           "_special_strings", "assistant_spans", "chatml_template", "encode", "encode_prompt", "end_of_turn_ids",
           "locate_turns", "model_name", "parse_template_kwargs", "prefix_spans", "render", "resolve_chat_template",
           "set_template_kwargs", "template_kwargs", "template_kwargs_problem"]
