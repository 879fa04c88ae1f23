// A SentencePiece-style ("llama" tokenizer) vocabulary that llama.cpp accepts: control tokens, the 256
// byte-fallback tokens <0x00>…<0xFF>, single characters, and words with every prefix present so the SPM
// bigram merges can reach each whole word. Deterministic: the same target size gives the same vocabulary.
import { TokenType } from './gguf-format.ts';

export const SPM_SPACE = '\u2581'; // "▁", SentencePiece's visible space

export interface Vocabulary {
  tokens: string[];
  scores: number[];
  types: number[];
  unk: number;
  bos: number;
  eos: number;
  imStart: number;
  imEnd: number;
}

const WORDS = (
  'the of and to a in is it you that he was for on are with as I his they be at one have this from or had by ' +
  'hot word but what some we can out other were all there when up use your how said an each she which do ' +
  'their time if will way about many then them write would like so these her long make thing see him two ' +
  'has look more day could go come did number sound no most people my over know water than call first who ' +
  'may down side been now find any new work part take get place made live where after back little only ' +
  'round man year came show every good me give our under name very through just form sentence great think ' +
  'say help low line differ turn cause much mean before move right boy old too same tell does set three ' +
  'want air well also play small end put home read hand port large spell add even land here must big high ' +
  'such follow act why ask men change went light kind off need house picture try us again animal point ' +
  'mother world near build self earth father hello model answer question private node secret request ' +
  'ing ed er tion ly es re un able ment ness ous ful est ity al ive ize'
).split(' ');

export function buildVocabulary(targetSize: number): Vocabulary {
  const tokens: string[] = [];
  const scores: number[] = [];
  const types: number[] = [];
  const seen = new Set<string>();
  const add = (piece: string, type: number, score: number): number => {
    if (seen.has(piece)) return tokens.indexOf(piece);
    seen.add(piece);
    tokens.push(piece);
    scores.push(score);
    types.push(type);
    return tokens.length - 1;
  };
  const unk = add('<unk>', TokenType.UNKNOWN, 0);
  const bos = add('<s>', TokenType.CONTROL, 0);
  const eos = add('</s>', TokenType.CONTROL, 0);
  const imStart = add('<|im_start|>', TokenType.CONTROL, 0);
  const imEnd = add('<|im_end|>', TokenType.CONTROL, 0);
  for (let b = 0; b < 256; b++) {
    add(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`, TokenType.BYTE, 0);
  }
  // Longer pieces score higher, so SPM's greedy bigram merging prefers whole words.
  const addPiece = (p: string): void => void add(p, TokenType.NORMAL, -1000 + p.length * 10 - tokens.length * 1e-3);
  addPiece(SPM_SPACE);
  for (let c = 0x21; c <= 0x7e; c++) addPiece(String.fromCharCode(c));
  for (const word of WORDS) {
    for (const form of [SPM_SPACE + word, word]) {
      for (let len = 2; len <= form.length; len++) addPiece(form.slice(0, len));
    }
  }
  // Larger vocabularies (the bench model's) are filled with synthetic pieces, deterministically.
  const letters = 'etaoinshrdlucmfwypvbgkqjxz';
  for (let i = 0; tokens.length < targetSize; i++) {
    let n = i;
    let piece = '';
    do {
      piece += letters[n % letters.length];
      n = Math.floor(n / letters.length);
    } while (n > 0);
    if (piece.length >= 2) {
      addPiece(SPM_SPACE + piece);
      if (tokens.length < targetSize) addPiece(piece);
    }
  }
  return { tokens, scores, types, unk, bos, eos, imStart, imEnd };
}
