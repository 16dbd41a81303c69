"""Reference models with Hugging Face parameter names (a linen BERT encoder, an NNX LLaMA-style
decoder), their checkpoint loading and tokenisation."""

from jpeft.models.bert import (BertAttention, BertConfig, BertEmbeddings, BertEncoder,
                               BertForSequenceClassification, BertIntermediate, BertLayer,
                               BertLayerStack, BertModel, BertOutput, BertPooler, BertSelfAttention,
                               BertSelfOutput, EncoderOutput, attention_bias, get_activation,
                               masked_mean)
from jpeft.models.llama import (KVCache, LlamaConfig, LlamaForCausalLM, LlamaModel, generate,
                                init_cache, llama_to_hf_state, load_hf_llama)
from jpeft.models.loading import (LoadReport, LoadedBert, flax_to_hf_state, hf_state_to_flax,
                                  load_hf_bert)
from jpeft.models.sharded_loading import load_hf_llama_sharded
from jpeft.models.tokenizer import encode, load_tokenizer

__all__ = [
    "BertAttention", "BertConfig", "BertEmbeddings", "BertEncoder", "BertForSequenceClassification",
    "BertIntermediate", "BertLayer", "BertLayerStack", "BertModel", "BertOutput", "BertPooler",
    "BertSelfAttention", "BertSelfOutput", "EncoderOutput", "KVCache", "LlamaConfig",
    "LlamaForCausalLM", "LlamaModel", "LoadReport", "LoadedBert", "attention_bias", "encode",
    "flax_to_hf_state", "generate", "get_activation", "hf_state_to_flax", "init_cache",
    "llama_to_hf_state", "load_hf_bert", "load_hf_llama", "load_hf_llama_sharded",
    "load_tokenizer", "masked_mean",
]
