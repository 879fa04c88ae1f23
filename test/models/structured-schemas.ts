// A JSON schema shared by the structured-output tests (issue 15): nested objects, enums, arrays, anyOf.
/** Nested objects, enums, arrays (bounded, so random weights always finish inside max_tokens). */
export const ORDER_SCHEMA_FOR_TESTS = {
  type: 'object',
  properties: {
    status: { type: 'string', enum: ['open', 'shipped', 'closed'] },
    customer: {
      type: 'object',
      properties: { name: { type: 'string', maxLength: 12 }, vip: { type: 'boolean' } },
      required: ['name', 'vip'],
      additionalProperties: false,
    },
    items: {
      type: 'array',
      maxItems: 3,
      items: {
        type: 'object',
        properties: { sku: { type: 'string', maxLength: 8 }, qty: { type: 'integer' }, size: { anyOf: [{ enum: ['s', 'm', 'l'] }, { type: 'null' }] } },
        required: ['sku', 'qty', 'size'],
        additionalProperties: false,
      },
    },
  },
  required: ['status', 'customer', 'items'],
  additionalProperties: false,
};

