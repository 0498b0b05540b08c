// Validates a HAR file against the HAR 1.2 JSON Schema of the npm package
// `har-schema` (the one `har-validator` uses), with ajv 6 and every format checked.
// Usage: NODE_PATH=<dir with ajv and har-schema> node scripts/validate-har.js FILE
// Exit 0 when valid; 1 with each error on stderr otherwise.
'use strict'
const fs = require('fs')
const Ajv = require('ajv')
const schemas = require('har-schema')

const ajv = new Ajv({ allErrors: true, format: 'full' })
ajv.addMetaSchema(require('ajv/lib/refs/json-schema-draft-06.json'))
for (const name of Object.keys(schemas)) {
  ajv.addSchema(schemas[name], name + '.json')
}
const har = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'))
const validate = ajv.getSchema('har.json')
if (!validate(har)) {
  for (const e of validate.errors) {
    console.error(`${e.dataPath || '(root)'}: ${e.message}`)
  }
  process.exit(1)
}
console.log(`valid HAR ${har.log.version}: ${har.log.entries.length} entries`)
